//! Every way the broker connection dies, many times over, under load: the broker application
//! stopped and started, the broker process killed and started again, our TCP connection cut,
//! every connection closed by the broker, and the memory alarm held past the publish deadline.
//! After each, the agent reconnects by itself and a session opened afterwards reaches the queue
//! exactly; the sessions that ran through the faults are in order, with a COM_QUIT at each loss;
//! at exit every unit is either in the queue or counted as lost, and the summary comes within
//! the shutdown deadline.
//!
//! The failure these guard against was intermittent (a publisher stuck in a broker operation
//! that never returned): each kind runs [`ROUNDS`] times with publishes in flight. A broker
//! frozen while the agent is idle is found by the heartbeat alone.

mod common;

use std::{
    collections::HashMap,
    io::Write,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use collector::encode::COM_QUIT;
use common::{
    Sink,
    agent::Agent,
    broker::{BrokerFaults, Fault, TestExchange},
    check_ended_at_losses, ended_at_losses, numbered_commands, numbered_query,
};

/// Rounds of a fault that costs little: a connection cut or closed, an exchange deleted.
const ROUNDS: usize = 20;
/// Rounds of one whose cost is the broker's, seconds a round (measured: a kill and restart
/// 11 s, an application stop 5.5 s, the memory alarm 8 s): fewer, to keep the suite inside
/// its time.
const SLOW_ROUNDS: usize = 8;
/// The agent's deadline for each broker operation (--rabbitmq_timeout).
const TIMEOUT_SECS: u64 = 3;
/// Sessions that send all through the faults.
const LOAD_SESSIONS: usize = 4;
/// Queries of each session opened after a fault.
const LATER_QUERIES: u32 = 20;

/// What the test took from the queue so far: per client port, the bytes of its units.
#[derive(Default)]
struct Taken {
    streams: HashMap<u16, Vec<u8>>,
    messages: u64,
    units: u64,
}

impl Taken {
    fn take(&mut self, mq: &TestExchange) {
        for m in mq.take_all() {
            if m.data == common::broker::PROBE {
                continue;
            }
            self.messages += 1;
            for u in collector::encode::decode_message(&m.data).unwrap().units {
                self.units += 1;
                self.streams.entry(u.port).or_default().extend(u.data);
            }
        }
    }

    fn ends_with_quit(&self, port: u16) -> bool {
        self.streams
            .get(&port)
            .is_some_and(|s| s.ends_with(&COM_QUIT))
    }
}

/// A client that sends a query every millisecond until told to stop, then its COM_QUIT.
fn load_session(
    addr: std::net::SocketAddr,
    s: usize,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<(u16, u32)> {
    std::thread::spawn(move || {
        let mut c = std::net::TcpStream::connect(addr).unwrap();
        c.set_nodelay(true).unwrap();
        let port = c.local_addr().unwrap().port();
        let mut sent = 0;
        while !stop.load(Ordering::Relaxed) {
            c.write_all(&numbered_query(s, sent)).unwrap();
            sent += 1;
            std::thread::sleep(Duration::from_millis(1));
        }
        c.write_all(&COM_QUIT).unwrap();
        (port, sent)
    })
}

/// The JSON status lines printed so far that came after `since` lines.
fn broker_state(lines: &[String], since: usize) -> Vec<String> {
    lines[since.min(lines.len())..]
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v.get("Broker").and_then(|b| b.as_str()).map(str::to_owned))
        .collect()
}

/// How often the agent logged that it replaced what `fault` kills: the connection, or (for
/// a deleted exchange) a publisher's channel.
fn replaced(fault: Fault, log: &str) -> usize {
    match fault {
        Fault::DeleteExchange => log.matches("publisher's channel open again").count(),
        _ => log.matches("connected to RabbitMQ again").count(),
    }
}

/// Stops the load sessions when dropped, also when the test fails half-way.
struct StopLoad(Arc<AtomicBool>);

impl Drop for StopLoad {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Survives `fault` [`ROUNDS`] times; `load`: sessions send all through the faults (else the
/// agent is idle between rounds); `causes`: the counters of the causes the fault may be
/// given up for (their sum counts every round).
async fn survive(fault: Fault, rounds: usize, load: bool, causes: &[&str]) {
    let started = Instant::now();
    // A deleted exchange is declared again by the agent, with its queue (a classic one: the
    // agent's declaration must match); the others survive the broker's restarts.
    let declares = fault == Fault::DeleteExchange;
    let mq = if declares {
        TestExchange::named("faults")
    } else {
        TestExchange::durable("faults")
    };
    let sink = Sink::start("127.0.0.1:0".parse().unwrap()).await;
    let mut args = vec![
        "--interface=lo".to_owned(),
        format!("--port={}", sink.addr.port()),
        format!("--rabbitmq_exchange_name={}", mq.exchange),
        format!("--rabbitmq_timeout={TIMEOUT_SECS}"),
        "--rabbitmq_confirm".into(),
        "--read_timeout=20".into(),
        "--status_interval=1".into(),
        "--status_format=json".into(),
        "--mysql_optional".into(),
        "--mysql_port=1".into(),
    ];
    if declares {
        args.push("--rabbitmq_declare".into());
        args.push(format!("--rabbitmq_queue={}", mq.queue));
    }
    let mut agent = Agent::start(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let stdout = agent.take_stdout_lines();
    agent.wait_attached();
    let faults = BrokerFaults::new();

    let stop = StopLoad(Arc::new(AtomicBool::new(false)));
    let load: Vec<_> = (0..if load { LOAD_SESSIONS } else { 0 })
        .map(|s| load_session(sink.addr, s, stop.0.clone()))
        .collect();
    let mut taken = Taken::default();
    // Open until the end, so that no later session reuses a client port (loopback reuses
    // ports in TIME_WAIT).
    let mut later = Vec::new();
    let mut later_quits = 0;
    for round in 0..rounds {
        let round_start = Instant::now();
        if declares {
            // Every publisher the last round hit has its channel back (else one still
            // waiting would declare the exchange again before anything fails).
            let start = Instant::now();
            loop {
                let log = agent.log.lock().unwrap().clone();
                if log.matches("closed the publisher's channel").count() == replaced(fault, &log) {
                    break;
                }
                assert!(
                    start.elapsed() < Duration::from_secs(60),
                    "{fault:?} round {round}: publishers' channels not back within 60 s; \
                     log:\n{log}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let before = replaced(fault, &agent.log.lock().unwrap());
        tokio::task::block_in_place(|| faults.cause(fault, &mq.exchange));
        if matches!(fault, Fault::Kill | Fault::StopApp) {
            // The broker's own recovery of the queue is not the agent's to wait for.
            tokio::task::block_in_place(|| {
                mq.wait_queue_running(120);
                mq.wait_routable(120);
            });
        }
        let lines_then = stdout.lock().unwrap().len();
        let fault_took = round_start.elapsed();
        let start = Instant::now();
        // Reconnected by itself, and a status line printed after the broker came back says
        // the connection is up.
        loop {
            let reconnected = replaced(fault, &agent.log.lock().unwrap()) > before;
            let up = broker_state(&stdout.lock().unwrap(), lines_then)
                .iter()
                .any(|b| b == "up");
            if reconnected && up {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "{fault:?} round {round}: no reconnection within 30 s (reconnected: \
                 {reconnected}, up: {up}); log:\n{}",
                agent.log.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let up_took = start.elapsed();
        // A session opened now reaches the queue whole.
        let replaced_then = replaced(fault, &agent.log.lock().unwrap());
        let s = 1000 + round;
        let c = tokio::task::block_in_place(|| {
            let mut c = std::net::TcpStream::connect(sink.addr).unwrap();
            c.set_nodelay(true).unwrap();
            for n in 0..LATER_QUERIES {
                c.write_all(&numbered_query(s, n)).unwrap();
                std::thread::sleep(Duration::from_millis(2));
            }
            c.write_all(&COM_QUIT).unwrap();
            c
        });
        let port = c.local_addr().unwrap().port();
        let start = Instant::now();
        while !taken.ends_with_quit(port) {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "{fault:?} round {round}: the session opened after the reconnection was not \
                 published within 30 s; log:\n{}",
                agent.log.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
            tokio::task::block_in_place(|| taken.take(&mq));
        }
        let got = numbered_commands(&taken.streams[&port], s);
        let whole: Vec<Option<u32>> = (0..LATER_QUERIES).map(Some).chain([None]).collect();
        if replaced(fault, &agent.log.lock().unwrap()) > replaced_then {
            // The broker took the new connection (or channel) away too, while this session
            // was published (the fault's command closing late, on a loaded machine): what was
            // in flight then ends it as any loss does, with a COM_QUIT of ours (a second one
            // when the lost message held its own).
            later_quits += ended_at_losses(&got, LATER_QUERIES, &format!("session {s}"))
                .unwrap_or_else(|e| panic!("{fault:?} round {round}: {e}"));
            eprintln!("{fault:?} round {round}: the broker cut session {s}'s connection too");
        } else {
            assert_eq!(got, whole, "{fault:?} round {round}: session {s}");
        }
        later.push(c);
        eprintln!(
            "{fault:?} round {round}: fault {fault_took:?}, up again {up_took:?}, round \
             {:?}",
            round_start.elapsed()
        );
    }
    drop(stop);
    let load: Vec<(u16, u32)> =
        tokio::task::block_in_place(|| load.into_iter().map(|t| t.join().unwrap()).collect());
    let start = Instant::now();
    while !load.iter().all(|&(port, _)| taken.ends_with_quit(port)) {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{fault:?}: the load sessions' last queries were not published"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        tokio::task::block_in_place(|| taken.take(&mq));
    }

    // The summary comes within the shutdown deadline (10 s for the publishers, 3 s for the
    // connection close), with nothing left waiting.
    let stopping = Instant::now();
    let log = agent.log.clone();
    tokio::task::block_in_place(|| drop(agent.stop()));
    let stopped_in = stopping.elapsed();
    tokio::task::block_in_place(|| taken.take(&mq));
    let lines = stdout.lock().unwrap().clone();
    let log = log.lock().unwrap().clone();
    let summary = exit_summary(&lines, &log);
    assert!(
        stopped_in < Duration::from_secs(14),
        "{fault:?}: the agent took {stopped_in:?} to exit"
    );
    let t = &summary["totals"];
    let get = |k: &str| {
        t[k].as_u64()
            .unwrap_or_else(|| panic!("{fault:?}: no {k} in the summary: {summary}"))
    };

    // The sessions that ran through the faults: in order, a jump only right after a COM_QUIT
    // of ours, each ending with its own quit.
    let mut quits_at_losses = later_quits;
    for (s, &(port, sent)) in load.iter().enumerate() {
        let got = numbered_commands(&taken.streams[&port], s);
        quits_at_losses += ended_at_losses(&got, sent, &format!("{fault:?} session {s}"))
            .unwrap_or_else(|e| panic!("{e}; the agent's log:\n{log}"));
    }
    assert_eq!(
        taken.streams.len(),
        load.len() + rounds,
        "{fault:?}: only the test's sessions were published"
    );

    // Counters add up. Every message the broker confirmed is in the queue; a message whose
    // fate was unknown when its connection died may be there too. Every unit handed to the
    // publishers (and every COM_QUIT they made) is published or counted lost, and every loss
    // got its COM_QUIT (a COM_QUIT can itself be lost in flight, and is then made again).
    let unknown = get("mq_in_flight_units");
    assert!(
        get("published_units") <= taken.units && taken.units <= get("published_units") + unknown,
        "{fault:?}: {} units in the queue: {summary}",
        taken.units
    );
    assert_eq!(
        get("batched_units") + get("mq_lost_sessions"),
        get("published_units")
            + get("mq_error_units")
            + unknown
            + get("mq_unroutable_units")
            + get("mq_lost_skipped")
            + get("queue_full")
            + get("mem_limit")
            + get("exit_unpublished"),
        "{fault:?}: {summary}"
    );
    assert!(
        quits_at_losses <= get("mq_lost_sessions"),
        "{fault:?}: {summary}"
    );
    assert!(
        unknown == 0 || quits_at_losses > 0,
        "{fault:?}: units lost in flight, and no session ended: {summary}"
    );
    assert_eq!(get("exit_unpublished"), 0, "{fault:?}: {summary}");
    if !declares {
        assert!(
            get("mq_reconnects") >= rounds as u64,
            "{fault:?}: {summary}"
        );
    }
    // Each round's death is counted under its cause; on a loaded machine a publish deadline
    // may pass first (then the connection is given up for that).
    let given_up: u64 = causes.iter().map(|c| get(c)).sum();
    assert!(
        given_up >= 1,
        "{fault:?}: {causes:?} never counted: {summary}"
    );
    assert!(
        given_up + get("mq_reconnect_timeout") >= rounds as u64,
        "{fault:?}: {causes:?} and timeouts add up to less than {rounds}: {summary}"
    );
    if let Fault::MemoryAlarm(_) = fault {
        // The blocked connection still works: its close is confirmed once the broker reads
        // again, so nothing it held can land after what the next connection publishes.
        for failed in [
            "closing the old connection failed",
            "before its close was confirmed",
        ] {
            assert!(!log.contains(failed), "{fault:?}: {failed}; log:\n{log}");
        }
    }
    eprintln!(
        "{fault:?}: {rounds} rounds in {:?}, {} reconnections, {} units published, {unknown} \
         lost in flight, {} dropped (memory), {} sessions ended at a loss; exit in \
         {stopped_in:?}; old connections whose close failed {}, gone before it {}",
        started.elapsed(),
        get("mq_reconnects"),
        get("published_units"),
        get("mem_limit"),
        quits_at_losses,
        log.matches("closing the old connection failed").count(),
        log.matches("before its close was confirmed").count(),
    );
    drop(later);
    drop(faults);
    drop(sink);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_application_stopped_and_started() {
    // RabbitMQ 3.10 resets the connections as its application stops.
    let causes = ["mq_reconnect_closed", "mq_reconnect_socket"];
    survive(Fault::StopApp, SLOW_ROUNDS, true, &causes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_process_killed_and_started() {
    survive(Fault::Kill, SLOW_ROUNDS, true, &["mq_reconnect_socket"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_connection_cut() {
    survive(Fault::CutTcp, ROUNDS, true, &["mq_reconnect_socket"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_connections_closed_by_the_broker() {
    survive(Fault::CloseAll, ROUNDS, true, &["mq_reconnect_closed"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_alarm_held_past_the_publish_deadline() {
    let hold = Duration::from_secs(TIMEOUT_SECS + 1);
    survive(
        Fault::MemoryAlarm(hold),
        SLOW_ROUNDS,
        true,
        &["mq_reconnect_blocked"],
    )
    .await;
}

/// The exchange deleted under load: the broker closes the channels that publish to it; each
/// publisher opens another after declaring the exchange again (`--rabbitmq_declare`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channels_closed_by_the_broker() {
    survive(
        Fault::DeleteExchange,
        ROUNDS,
        true,
        &["mq_reconnect_channel"],
    )
    .await;
}

/// The broker process frozen (SIGSTOP) while the agent is idle: only the heartbeat tells.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_frozen_while_idle_is_noticed_by_the_heartbeat() {
    // Two heartbeat intervals (--rabbitmq_timeout each) and a margin.
    let hold = Duration::from_secs(2 * TIMEOUT_SECS + 2);
    survive(Fault::Freeze(hold), 3, false, &["mq_reconnect_heartbeat"]).await;
}

/// The JSON exit summary among the agent's stdout lines.
fn exit_summary(lines: &[String], log: &str) -> serde_json::Value {
    lines
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["summary"] == true)
        .unwrap_or_else(|| panic!("no exit summary; log:\n{log}"))
}

/// An agent publishing to `mq` what clients send to `sink`, without MySQL, status as JSON.
fn unrouted_agent(
    mq: &TestExchange,
    sink: &Sink,
    extra: &[&str],
) -> (Agent, Arc<std::sync::Mutex<Vec<String>>>) {
    let mut args = vec![
        "--interface=lo".to_owned(),
        format!("--port={}", sink.addr.port()),
        format!("--rabbitmq_exchange_name={}", mq.exchange),
        "--read_timeout=20".into(),
        "--status_format=json".into(),
        "--mysql_optional".into(),
        "--mysql_port=1".into(),
    ];
    args.extend(extra.iter().map(|a| a.to_string()));
    let mut agent = Agent::start(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let stdout = agent.take_stdout_lines();
    agent.wait_attached();
    (agent, stdout)
}

/// Sends queries `from..to` of test session `s`, 2 ms apart.
fn send_queries(mut c: &std::net::TcpStream, s: usize, from: u32, to: u32) {
    for n in from..to {
        c.write_all(&numbered_query(s, n)).unwrap();
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// No queue bound to the exchange (not yet, or its binding gone with a deleted exchange):
/// every message comes back (published mandatory), counts as unroutable, and its session
/// ends. Once a queue is bound, the session goes on from its next command after a COM_QUIT,
/// and a session opened then is exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_no_queue_takes_are_counted_and_their_sessions_end() {
    const QUERIES: u32 = 50;
    let mq = TestExchange::unbound("unrouted");
    let sink = Sink::start("127.0.0.1:0".parse().unwrap()).await;
    let (agent, stdout) = unrouted_agent(&mq, &sink, &["--status_interval=1"]);
    let early = tokio::task::block_in_place(|| {
        let c = std::net::TcpStream::connect(sink.addr).unwrap();
        c.set_nodelay(true).unwrap();
        send_queries(&c, 0, 0, QUERIES);
        c
    });
    agent.wait_log("routed a message to no queue").await;
    mq.bind();
    let late = tokio::task::block_in_place(|| {
        send_queries(&early, 0, QUERIES, 2 * QUERIES);
        (&early).write_all(&COM_QUIT).unwrap();
        let mut c = std::net::TcpStream::connect(sink.addr).unwrap();
        c.set_nodelay(true).unwrap();
        send_queries(&c, 1, 0, QUERIES);
        c.write_all(&COM_QUIT).unwrap();
        c
    });
    let ports = [
        early.local_addr().unwrap().port(),
        late.local_addr().unwrap().port(),
    ];
    let mut taken = Taken::default();
    let start = Instant::now();
    while !ports.iter().all(|&p| taken.ends_with_quit(p)) {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the sessions were not published within 30 s after the queue was bound; log:\n{}",
            agent.log.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        tokio::task::block_in_place(|| taken.take(&mq));
    }
    let log = agent.log.clone();
    tokio::task::block_in_place(|| drop(agent.stop()));
    tokio::task::block_in_place(|| taken.take(&mq));
    let summary = exit_summary(&stdout.lock().unwrap(), &log.lock().unwrap());
    let t = &summary["totals"];
    let get = |k: &str| {
        t[k].as_u64()
            .unwrap_or_else(|| panic!("no {k} in the summary: {summary}"))
    };

    // The early session: nothing of before the binding but our COM_QUIT, first; then its
    // queries from a command on, in order, and its own quit.
    let got = numbered_commands(&taken.streams[&ports[0]], 0);
    assert_eq!(
        got[0], None,
        "the early session starts with our COM_QUIT: {got:?}"
    );
    assert!(
        check_ended_at_losses(&got, 2 * QUERIES, "early session") >= 1,
        "{got:?}"
    );
    let whole: Vec<Option<u32>> = (0..QUERIES).map(Some).chain([None]).collect();
    assert_eq!(
        numbered_commands(&taken.streams[&ports[1]], 1),
        whole,
        "the session opened after the binding"
    );
    let unroutable = get("mq_unroutable_units");
    assert!(unroutable > 0, "{summary}");
    assert!(get("mq_errors") > 0, "{summary}");
    assert_eq!(taken.units, get("published_units"), "{summary}");
    assert_eq!(
        get("batched_units") + get("mq_lost_sessions"),
        get("published_units") + unroutable + get("mq_lost_skipped"),
        "{summary}"
    );
    eprintln!(
        "{unroutable} units unroutable, {} COM_QUITs made, {} skipped until a command",
        get("mq_lost_sessions"),
        get("mq_lost_skipped")
    );
}

/// The agent stopped while no queue takes its messages: the publisher holding them gives up
/// at the exit deadline while the others finished at once (tokio panicked on a finished
/// publisher's handle polled again, and the agent died without its summary); what waited
/// is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopped_while_no_queue_takes_messages_the_agent_counts_what_waited() {
    let mq = TestExchange::unbound("unrouted_exit");
    let sink = Sink::start("127.0.0.1:0".parse().unwrap()).await;
    let (agent, stdout) = unrouted_agent(&mq, &sink, &["--thread_count=4"]);
    let c = tokio::task::block_in_place(|| {
        let c = std::net::TcpStream::connect(sink.addr).unwrap();
        c.set_nodelay(true).unwrap();
        send_queries(&c, 0, 0, 20);
        c
    });
    agent.wait_log("routed a message to no queue").await;
    // Queries that wait behind the held COM_QUIT.
    tokio::task::block_in_place(|| send_queries(&c, 0, 20, 40));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stopping = Instant::now();
    let log = agent.log.clone();
    // `stop` asserts a clean exit.
    tokio::task::block_in_place(|| drop(agent.stop()));
    let stopped_in = stopping.elapsed();
    let summary = exit_summary(&stdout.lock().unwrap(), &log.lock().unwrap());
    assert!(
        stopped_in < Duration::from_secs(16),
        "exit took {stopped_in:?}"
    );
    let t = &summary["totals"];
    let get = |k: &str| t[k].as_u64().unwrap_or_else(|| panic!("no {k}: {summary}"));
    assert!(get("mq_unroutable_units") > 0, "{summary}");
    assert!(get("exit_unpublished") > 0, "{summary}");
    assert_eq!(get("published_units"), 0, "{summary}");
    assert_eq!(
        get("batched_units") + get("mq_lost_sessions"),
        get("mq_unroutable_units")
            + get("mq_in_flight_units")
            + get("mq_lost_skipped")
            + get("exit_unpublished"),
        "{summary}"
    );
    assert!(
        log.lock().unwrap().contains("did not finish"),
        "{}",
        log.lock().unwrap()
    );
    drop(c);
}

/// The fixture these tests read the queue with (a consumer, not a basic.get per message)
/// takes every message once and in order while publishing goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queue_fixture_takes_every_message_in_order_while_publishing_goes_on() {
    use lapin::{BasicProperties, Connection, ConnectionProperties, options::*};
    const N: u32 = 20_000;
    let mq = TestExchange::durable("fixture");
    let exchange = mq.exchange.clone();
    let publisher = tokio::spawn(async move {
        let uri = common::broker::AMQP_URI;
        let conn = Connection::connect(uri, ConnectionProperties::default())
            .await
            .unwrap();
        let ch = conn.create_channel().await.unwrap();
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        for i in 0..N {
            let confirm = ch
                .basic_publish(
                    exchange.as_str().into(),
                    "".into(),
                    BasicPublishOptions::default(),
                    &i.to_le_bytes(),
                    BasicProperties::default(),
                )
                .await
                .unwrap();
            if i % 500 == 0 {
                confirm.await.unwrap();
            }
        }
        ch.wait_for_confirms().await.unwrap();
        conn.close(200, "".into()).await.unwrap();
    });
    let mut got = Vec::new();
    while !publisher.is_finished() || got.len() < N as usize {
        let taken = tokio::task::block_in_place(|| mq.take_all());
        got.extend(
            taken
                .iter()
                .map(|m| u32::from_le_bytes(m.data[..].try_into().unwrap())),
        );
        assert!(got.len() <= N as usize);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    publisher.await.unwrap();
    assert!(got.iter().copied().eq(0..N), "out of order or incomplete");
}
