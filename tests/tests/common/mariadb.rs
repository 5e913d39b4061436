//! A MariaDB server of the test's own: fresh datadir, its own loopback port and socket, the
//! test user `mrte`/`mrte`. Stopped and removed on drop; it also dies with the test process
//! (parent-death signal), and a later start removes datadirs left by dead test processes.

use std::{
    net::{SocketAddr, TcpListener},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use nix::{sys::signal::Signal, unistd::Pid};

const ROOT: &str = "/tmp/mrte-test-mariadb";

pub struct TestServer {
    pub port: u16,
    pub server_id: u32,
    dir: PathBuf,
    extra: Vec<String>,
    child: Option<Child>,
}

impl TestServer {
    /// Starts a server with binary logging (so it can be a replication source) and `extra`
    /// server options.
    pub fn start(extra: &[&str]) -> Self {
        remove_orphans();
        let name = super::unique("db");
        let dir = Path::new(ROOT).join(format!("{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let data = dir.join("data");
        super::sh(&[
            "mariadb-install-db",
            "--no-defaults",
            "--user=root",
            "--skip-test-db",
            "--auth-root-authentication-method=socket",
            &format!("--datadir={}", data.display()),
        ]);
        let port = free_port();
        let mut server = Self {
            port,
            server_id: 100 + port as u32,
            dir,
            extra: extra.iter().map(|a| a.to_string()).collect(),
            child: None,
        };
        server.spawn();
        server.root_sql(&format!(
            "CREATE USER '{u}'@'%' IDENTIFIED BY '{p}'; GRANT ALL ON *.* TO '{u}'@'%' WITH GRANT OPTION;
             CREATE USER '{u}'@'localhost' IDENTIFIED BY '{p}';
             GRANT ALL ON *.* TO '{u}'@'localhost' WITH GRANT OPTION;",
            u = super::MYSQL_USER,
            p = super::MYSQL_PASSWORD
        ));
        server
    }

    /// Runs `mariadbd` on the datadir and waits until it answers.
    fn spawn(&mut self) {
        let data = self.dir.join("data");
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(self.dir.join("server.log"))
            .unwrap();
        let child = unsafe {
            Command::new("mariadbd")
                .arg("--no-defaults")
                .arg("--user=root")
                .arg(format!("--datadir={}", data.display()))
                .arg(format!("--socket={}", self.dir.join("sock").display()))
                .arg(format!("--pid-file={}", self.dir.join("pid").display()))
                .arg(format!("--port={}", self.port))
                .arg("--bind-address=127.0.0.1")
                .arg(format!("--log-bin={}", self.dir.join("data/bin").display()))
                .arg(format!("--server-id={}", self.server_id))
                .arg("--innodb-buffer-pool-size=32M")
                .arg("--innodb-log-file-size=16M")
                .args(&self.extra)
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .pre_exec(|| {
                    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
                    Ok(())
                })
                .spawn()
                .unwrap()
        };
        self.child = Some(child);
        self.wait_ready();
    }

    /// Shuts the server down (SIGTERM, as an init system would), waits `down`, starts it again
    /// on the same port and data.
    pub fn restart(&mut self, down: Duration) {
        self.stop();
        std::thread::sleep(down);
        self.spawn();
    }

    /// [`restart`](Self::restart) with other server options than it was started with.
    pub fn restart_with(&mut self, extra: &[&str], down: Duration) {
        self.extra = extra.iter().map(|a| a.to_string()).collect();
        self.restart(down);
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = nix::sys::signal::kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(20);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub fn opts(&self) -> mysql_async::Opts {
        super::mysql_opts(self.addr())
    }

    /// Runs SQL as the server's root over its socket, without TLS (the client's default is
    /// to use it where the server offers it, and then the server's TLS reads of the test's
    /// own sessions would count in the agent's); panics on failure.
    pub fn root_sql(&self, sql: &str) -> String {
        self.root_sql_with(&["--skip-ssl"], sql)
    }

    /// [`Self::root_sql`] with other client options (`--ssl`: over TLS).
    pub fn root_sql_with(&self, options: &[&str], sql: &str) -> String {
        let out = Command::new("mariadb")
            .arg(format!("--socket={}", self.dir.join("sock").display()))
            .args(options)
            .args(["--batch", "--skip-column-names", "-e", sql])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ok = Command::new("mariadb-admin")
                .arg(format!("--socket={}", self.dir.join("sock").display()))
                .args(["--connect-timeout=1", "ping"])
                .output()
                .is_ok_and(|o| o.status.success());
            if ok {
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("mariadbd exited ({status}): {}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "mariadbd not ready: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits (at most 60 s) until no more than `most` client connections are left (the
    /// agent's own, say): the server has read the others' last commands, their COM_QUITs
    /// too, which over TLS is when the capture sees them (it reads what the server decrypts).
    pub fn wait_connections(&self, most: usize) {
        let sql = "SELECT COUNT(*) FROM information_schema.PROCESSLIST \
                   WHERE COMMAND NOT IN ('Daemon', 'Binlog Dump') AND ID <> CONNECTION_ID() \
                   AND USER NOT IN ('system user', 'event_scheduler')";
        let start = Instant::now();
        loop {
            let n: usize = self.root_sql(sql).trim().parse().unwrap();
            if n <= most {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "{n} connections left: {}",
                self.root_sql("SHOW PROCESSLIST")
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A loopback port nothing listens on now.
fn free_port() -> u16 {
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        // Stay clear of the shared server and the frames' fixed port.
        if port != 3306 && port != super::frames::PORT {
            return port;
        }
    }
}

/// Removes the datadirs of test processes that no longer run (their servers died with them).
fn remove_orphans() {
    let Ok(entries) = std::fs::read_dir(ROOT) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let pid = name.split('-').next().and_then(|p| p.parse::<i32>().ok());
        if let Some(pid) = pid
            && !Path::new(&format!("/proc/{pid}")).exists()
        {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}
