//! BPF_PROG_TEST_RUN hands crafted frames straight to the program, VLAN tags still in the
//! bytes (no interface moves the outer one to metadata): parser edge cases, and proof that the
//! program never acts on or changes a packet.

mod common;

use std::time::Duration;

use collector::capture::CaptureConfig;
use collector_common::Counter;
use common::{frames::*, *};

/// TC_ACT_UNSPEC: "continue" (TCX_NEXT), never drop, redirect or pass-and-stop.
const CONTINUE: i32 = -1;

/// Frames the test run itself refuses (EINVAL: it wants a whole IP header); the veth test
/// covers them on the real path.
const REFUSED: [&str; 2] = ["IPv4 header cut", "IPv6 header cut"];

fn refused(run: Result<collector::capture::TestRun, collector::capture::CaptureError>) -> bool {
    use aya::programs::ProgramError;
    matches!(
        run,
        Err(collector::capture::CaptureError::TestRun { source, .. })
            if matches!(&*source, ProgramError::SyscallError(e)
                if e.io_error.raw_os_error() == Some(libc::EINVAL))
    )
}

#[tokio::test]
async fn every_frame_continues_unchanged_and_moves_its_counter() {
    // Attached to a port on lo that nothing uses: test runs are the only captured traffic.
    let mut cap = TestCapture::start_with(CaptureConfig::new("lo", vec![PORT]));
    for case in cases() {
        // With every tag in the bytes, three tags are one too many.
        let counter = if case.name == "three tags" {
            Counter::VlanTooDeep
        } else {
            case.counter
        };
        let before = cap.counters();
        if REFUSED.contains(&case.name) {
            assert!(
                refused(cap.capture.test_run(&case.frame, 1)),
                "{}",
                case.name
            );
            continue;
        }
        let run = cap.capture.test_run(&case.frame, 1).unwrap();
        let after = cap.counters();
        assert_eq!(run.retval, CONTINUE, "{}", case.name);
        assert_eq!(run.frame_out, case.frame, "{}: frame changed", case.name);
        assert_eq!(
            delta(&before, &after, counter),
            1,
            "{}: {counter:?}",
            case.name
        );
        let want = u64::from(case.record.is_some() && case.name != "three tags");
        assert_eq!(
            delta(&before, &after, Counter::Records),
            want,
            "{}",
            case.name
        );
    }
    let expected = cases()
        .iter()
        .filter(|c| c.record.is_some() && c.name != "three tags")
        .count();
    cap.collect_until(Duration::from_secs(5), "records", |r, _| {
        r.len() >= expected
    })
    .await;
    let (control, payload): (Vec<_>, Vec<_>) = cap.records.iter().partition(|r| r.data.is_empty());
    assert!(
        payload
            .iter()
            .all(|r| &r.data[..] == b"\x05\x00\x00\x00\x03hello")
    );
    // Header-only records: exactly the SYN/FIN/RST cases, flags as sent.
    let controls = cases()
        .iter()
        .filter(|c| c.counter == Counter::Control)
        .count();
    assert_eq!(control.len(), controls);
    assert!(
        control
            .iter()
            .all(|r| r.tcp_flags & 0x07 != 0 && r.segment_len == 0)
    );
}

#[tokio::test]
async fn frames_shorter_than_ethernet_are_refused_by_the_kernel_not_parsed() {
    let cap = TestCapture::start_with(CaptureConfig::new("lo", vec![PORT]));
    // The test run needs a whole Ethernet header; shorter frames never reach any program.
    assert!(refused(cap.capture.test_run(&[0u8; 10], 1)));
    let before = cap.counters();
    assert!(cap.capture.test_run(&[0u8; 14], 1).is_ok());
    assert_eq!(delta(&before, &cap.counters(), Counter::NotIp), 1);
}

/// A frame for another host's MAC (what promiscuous mode or a mirror port lets in; the test
/// run's `eth_type_trans` on lo, whose address is all zeros, marks it PACKET_OTHERHOST): left
/// out and counted as other_host, before it is even a TotalPacket; with `other_hosts`, captured.
#[tokio::test]
async fn other_hosts_frames_are_left_out_unless_asked_for() {
    let payload = b"\x05\x00\x00\x00\x03hello";
    let mut frame = frame(0x0800, &ipv4(5, 6, 0, None, &tcp(PORT, 5, 0x18, payload)));
    frame[..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x09]);
    let cap = TestCapture::start_with(CaptureConfig::new("lo", vec![PORT]));
    let before = cap.counters();
    let run = cap.capture.test_run(&frame, 1).unwrap();
    assert_eq!(run.retval, CONTINUE);
    let after = cap.counters();
    assert_eq!(delta(&before, &after, Counter::OtherHost), 1);
    for c in [Counter::TcpToPort, Counter::WithPayload, Counter::Records] {
        assert_eq!(delta(&before, &after, c), 0, "{c:?}");
    }
    drop(cap);

    let mut cfg = CaptureConfig::new("lo", vec![PORT]);
    cfg.other_hosts = true;
    let mut cap = TestCapture::start_with(cfg);
    let before = cap.counters();
    cap.capture.test_run(&frame, 1).unwrap();
    let after = cap.counters();
    assert_eq!(delta(&before, &after, Counter::OtherHost), 0);
    assert_eq!(delta(&before, &after, Counter::Records), 1);
    cap.collect_until(Duration::from_secs(5), "the record", |r, _| !r.is_empty())
        .await;
    assert_eq!(&cap.records[0].data[..], payload);
}

/// A server's segment to the client of `frames::tcp`'s frames: addresses and ports swapped.
fn from_server(payload: &[u8]) -> Vec<u8> {
    let mut t = tcp(PORT, 5, 0x18, payload);
    t[0..2].copy_from_slice(&PORT.to_be_bytes());
    t[2..4].copy_from_slice(&40000u16.to_be_bytes());
    let mut ip = ipv4(5, 6, 0, None, &t);
    ip[12..16].copy_from_slice(&DST4);
    ip[16..20].copy_from_slice(&SRC4);
    frame(0x0800, &ip)
}

fn mysql_packet(seq: u8, payload: &[u8]) -> Vec<u8> {
    let mut p = (payload.len() as u32).to_le_bytes()[..3].to_vec();
    p.push(seq);
    p.extend_from_slice(payload);
    p
}

/// The prepared-statement path of both programs: the ingress program marks a connection on a
/// COM_STMT_PREPARE (also behind a COM_STMT_CLOSE in the same segment; once per segment, not
/// again for its retransmission); the egress program hands over the head of the reply that
/// starts next, once, and nothing of other traffic; a FIN ends the wait.
#[tokio::test]
async fn the_reply_program_takes_only_the_awaited_reply() {
    use collector::capture::{REPLIES_PROGRAM_NAME, RecordKind};
    let mut cfg = CaptureConfig::new("lo", vec![PORT]);
    cfg.prepared = true;
    let mut cap = TestCapture::start_with(cfg);
    let run = |cap: &TestCapture, program: &'static str, f: &[u8]| {
        let r = cap.capture.test_run_of(program, f, 1).unwrap();
        assert_eq!(r.retval, CONTINUE);
        assert_eq!(r.frame_out, f, "the frame is left as it was");
    };
    let ingress = collector::capture::PROGRAM_NAME;
    let mut payload = mysql_packet(0, &[0x19, 7, 0, 0, 0]);
    payload.extend(mysql_packet(0, b"\x16SELECT ?"));
    let prepare = frame(0x0800, &ipv4(5, 6, 0, None, &tcp(PORT, 5, 0x18, &payload)));
    let mut ok = mysql_packet(1, &[0, 9, 0, 0, 0, 1, 0, 1, 0, 0, 0, 0]);
    ok.extend(mysql_packet(2, &[3, b'd', b'e', b'f']));
    let reply = from_server(&ok);

    // Unrelated traffic on egress: the client's own segment leaving (not from the port).
    run(&cap, REPLIES_PROGRAM_NAME, &prepare);
    // A reply nobody awaits.
    run(&cap, REPLIES_PROGRAM_NAME, &reply);
    run(&cap, ingress, &prepare);
    run(&cap, ingress, &prepare);
    let c = cap.counters();
    assert_eq!(c.get(Counter::PrepareMarked), 1, "marked once");
    // Not the reply: the rest of an earlier one (sequence id 2).
    run(
        &cap,
        REPLIES_PROGRAM_NAME,
        &from_server(&mysql_packet(2, b"xyz")),
    );
    run(&cap, REPLIES_PROGRAM_NAME, &reply);
    // Taken: the same again is not awaited any more.
    run(&cap, REPLIES_PROGRAM_NAME, &reply);
    // Marked again, then the client's FIN: the reply is not taken.
    run(&cap, ingress, &prepare);
    let fin = frame(0x0800, &ipv4(5, 6, 0, None, &tcp(PORT, 5, 0x11, b"")));
    run(&cap, ingress, &fin);
    run(&cap, REPLIES_PROGRAM_NAME, &reply);

    cap.collect_until(Duration::from_secs(5), "the reply record", |r, _| {
        r.iter().any(|r| !r.is_client())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (records, _, capture) = cap.stop().await;
    let replies: Vec<_> = records.iter().filter(|r| !r.is_client()).collect();
    assert_eq!(replies.len(), 1, "{replies:?}");
    let r = replies[0];
    assert_eq!(r.kind, RecordKind::PrepareReply { awaiting: 1 });
    assert_eq!(&r.data[..], &ok[..16]);
    assert_eq!((r.sport, r.dport), (PORT, 40000));
    assert_eq!(r.client(), (std::net::IpAddr::from(SRC4), 40000));
    let e = capture.read_reply_counters().unwrap();
    let got = [
        Counter::Packets,
        Counter::Unawaited,
        Counter::OtherPort,
        Counter::TcpToPort,
        Counter::Awaited,
        Counter::NotReply,
        Counter::Records,
    ]
    .map(|k| e.get(k));
    // 6 packets: 4 while no connection awaited a reply (passed unparsed), 2 from the port of
    // the awaiting connection (one not a reply start), 1 record.
    assert_eq!(got, [6, 4, 0, 2, 2, 1, 1]);
    assert_eq!(e.get(Counter::Bytes), 16);
}

/// Several ports: the first is matched by a load-time constant, the others through the port
/// array. Segments to each are captured, on any other port (the reply direction too) left out.
#[tokio::test]
async fn every_given_port_is_captured_and_only_those() {
    let payload = b"\x05\x00\x00\x00\x03hello";
    let ports = [PORT, PORT + 7, PORT + 9];
    let mut cap = TestCapture::start_with(CaptureConfig::new("lo", ports.to_vec()));
    for (dport, captured) in [
        (ports[0], true),
        (ports[1], true),
        (ports[2], true),
        (PORT + 1, false),
        (PORT + 8, false),
    ] {
        let frame = frame(0x0800, &ipv4(5, 6, 0, None, &tcp(dport, 5, 0x18, payload)));
        let before = cap.counters();
        assert_eq!(cap.capture.test_run(&frame, 1).unwrap().retval, CONTINUE);
        let after = cap.counters();
        let (records, other) = if captured { (1, 0) } else { (0, 1) };
        assert_eq!(
            delta(&before, &after, Counter::Records),
            records,
            "port {dport}"
        );
        assert_eq!(
            delta(&before, &after, Counter::OtherPort),
            other,
            "port {dport}"
        );
    }
    cap.collect_until(Duration::from_secs(5), "records", |r, _| r.len() >= 3)
        .await;
    let mut got: Vec<u16> = cap.records.iter().map(|r| r.dport).collect();
    got.sort_unstable();
    assert_eq!(got, ports.to_vec());
}
