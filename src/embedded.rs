//! A private PostgreSQL cluster: `initdb` into a directory of our own, `postgres` on a port and
//! socket directory of its own, stopped on drop.
//!
//! `initdb` and `postgres` refuse to run as root; as root (containers, CI) the binaries run as the
//! `postgres` system user that Debian's packages create, with the data directory owned by it.
//! When that user cannot reach the data directory (a clone in root's 0700 home directory), the
//! cluster is kept under [`FALLBACK_ROOT`] instead, and the log says where.
//!
//! [`PrivateCluster::start`] is for throwaway clusters (tests): `fsync` off. The cluster that
//! holds a user's real roles and audit starts with [`ClusterOptions::durable`].

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("no PostgreSQL binaries found (initdb on PATH or under /usr/lib/postgresql/*/bin)")]
    NoBinaries,
    #[error("running as root, but there is no `postgres` system user to run PostgreSQL as")]
    NoServiceUser,
    #[error("{step} failed: {detail}")]
    Step { step: &'static str, detail: String },
    #[error("the cluster did not accept connections within {0:?}")]
    NotReady(Duration),
}

/// How to stop the server.
#[derive(Clone, Copy, Debug)]
pub enum StopMode {
    /// Roll back open transactions, disconnect clients, shut down cleanly.
    Fast,
    /// Abort at once, like a crash; recovery runs at next start.
    Immediate,
}

/// Where a cluster goes when running as root and the `postgres` user cannot reach the data
/// directory asked for: `<FALLBACK_ROOT>/<that path with '/' as '-'>`.
pub const FALLBACK_ROOT: &str = "/var/lib/rolecache";

/// How to start a cluster.
#[derive(Clone, Debug, Default)]
pub struct ClusterOptions {
    /// `fsync` on and a synced `initdb`: for a cluster whose data matters. Off (the default) is
    /// for throwaway clusters only: an OS crash can corrupt them.
    pub durable: bool,
    /// Extra server settings (`-c name=value`).
    pub settings: Vec<(String, String)>,
    /// Files written into the data directory before each start (e.g. TLS certificate and key),
    /// owned by the server's user, mode 0600.
    pub files: Vec<(String, Vec<u8>)>,
    /// Replaces `pg_hba.conf` before each start.
    pub hba: Option<String>,
}

/// A running private cluster. Dropping it stops the server.
#[derive(Debug)]
pub struct PrivateCluster {
    bin_dir: PathBuf,
    data_dir: PathBuf,
    socket_dir: PathBuf,
    port: u16,
    run_as: Option<String>,
    running: bool,
    options: ClusterOptions,
}

impl PrivateCluster {
    /// The directory holding `initdb`, `pg_ctl` and `postgres`, if PostgreSQL is installed.
    pub fn find_bin_dir() -> Option<PathBuf> {
        if let Some(path) = std::env::var_os("PATH") {
            for dir in std::env::split_paths(&path) {
                if dir.join("initdb").is_file() && dir.join("pg_ctl").is_file() {
                    return Some(dir);
                }
            }
        }
        let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
            .ok()?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let major = e.file_name().to_str()?.parse().ok()?;
                let bin = e.path().join("bin");
                bin.join("initdb").is_file().then_some((major, bin))
            })
            .collect();
        versions.sort();
        versions.pop().map(|(_, bin)| bin)
    }

    /// Starts a throwaway cluster (`fsync` off) in `data_dir` (created by `initdb` if it holds
    /// none yet) on `port` (0: a free one), with trust authentication for local connections only.
    pub fn start(data_dir: &Path, port: u16) -> Result<Self, ClusterError> {
        Self::start_with(data_dir, port, ClusterOptions::default())
    }

    /// [`PrivateCluster::start`] with options.
    pub fn start_with(
        data_dir: &Path,
        port: u16,
        options: ClusterOptions,
    ) -> Result<Self, ClusterError> {
        let bin_dir = Self::find_bin_dir().ok_or(ClusterError::NoBinaries)?;
        // SAFETY: geteuid has no preconditions and cannot fail.
        let run_as = if unsafe { libc::geteuid() } == 0 {
            let exists = Command::new("id")
                .arg("-u")
                .arg("postgres")
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false);
            if !exists {
                return Err(ClusterError::NoServiceUser);
            }
            Some("postgres".to_string())
        } else {
            None
        };
        let port = if port == 0 { free_port()? } else { port };
        // pg_ctl runs from `/`: the data directory must be absolute.
        let data_dir = &std::path::absolute(data_dir).map_err(|e| ClusterError::Step {
            step: "resolve data directory",
            detail: e.to_string(),
        })?;
        let durable = options.durable;
        let mut cluster = PrivateCluster {
            bin_dir,
            data_dir: data_dir.to_path_buf(),
            // Socket and log live beside the data directory, in a directory the server user owns.
            socket_dir: data_dir.with_extension("run"),
            port,
            run_as,
            running: false,
            options,
        };
        cluster.prepare_dirs()?;
        if cluster.run_as.is_some() && !cluster.reachable() {
            let fallback = fallback_dir(&cluster.data_dir);
            tracing::warn!(
                asked = %cluster.data_dir.display(),
                using = %fallback.display(),
                "the postgres user cannot reach the data directory (a parent directory is private, \
                 e.g. a 0700 home directory): keeping the cluster in {} instead",
                fallback.display()
            );
            cluster.data_dir = fallback.clone();
            cluster.socket_dir = fallback.with_extension("run");
            cluster.prepare_dirs()?;
            if !cluster.reachable() {
                return Err(ClusterError::Step {
                    step: "data directory",
                    detail: format!(
                        "neither {} nor {} is reachable by the postgres user",
                        data_dir.display(),
                        fallback.display()
                    ),
                });
            }
        }
        if !cluster.data_dir.join("PG_VERSION").is_file() {
            let data = cluster.data_dir.to_string_lossy().into_owned();
            let mut args = vec!["-D", &data, "-U", "postgres", "--auth=trust", "-E", "UTF8"];
            if !durable {
                args.push("--no-sync");
            }
            cluster.run("initdb", "initdb", &args)?;
        }
        // A server left running on this directory (our process was killed): stop it, then
        // start it with our settings.
        let data = cluster.data_dir.to_string_lossy().into_owned();
        if cluster
            .run("pg_ctl status", "pg_ctl", &["-D", &data, "status"])
            .is_ok()
        {
            cluster.run(
                "pg_ctl stop",
                "pg_ctl",
                &["-D", &data, "-m", "fast", "-w", "stop"],
            )?;
        }
        cluster.start_server()?;
        Ok(cluster)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// A URL for database `dbname` as the `postgres` superuser over TCP.
    pub fn url(&self, dbname: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{dbname}", self.port)
    }

    /// Stops the server (no-op if it is not running).
    pub fn stop(&mut self, mode: StopMode) -> Result<(), ClusterError> {
        if !self.running {
            return Ok(());
        }
        let mode = match mode {
            StopMode::Fast => "fast",
            StopMode::Immediate => "immediate",
        };
        let data = self.data_dir.to_string_lossy().into_owned();
        self.run(
            "pg_ctl stop",
            "pg_ctl",
            &["-D", &data, "-m", mode, "-w", "stop"],
        )?;
        self.running = false;
        Ok(())
    }

    /// Starts the server again on the same port after [`PrivateCluster::stop`].
    pub fn start_server(&mut self) -> Result<(), ClusterError> {
        self.write_files()?;
        let data = self.data_dir.to_string_lossy().into_owned();
        let log = self
            .socket_dir
            .join("postgres.log")
            .to_string_lossy()
            .into_owned();
        let mut options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c max_connections=200",
            self.port,
            self.socket_dir.display()
        );
        if !self.options.durable {
            options.push_str(" -c fsync=off");
        }
        for (name, value) in &self.options.settings {
            options.push_str(&format!(" -c {name}={value}"));
        }
        self.run(
            "pg_ctl start",
            "pg_ctl",
            &[
                "-D", &data, "-l", &log, "-o", &options, "-w", "-t", "60", "start",
            ],
        )?;
        self.running = true;
        self.wait_ready(Duration::from_secs(30))
    }

    /// Whether the server's user can reach the data directory (always, when not running as
    /// root).
    fn reachable(&self) -> bool {
        let Some(user) = &self.run_as else {
            return true;
        };
        Command::new("runuser")
            .arg("-u")
            .arg(user)
            .arg("--")
            .arg("test")
            .arg("-w")
            .arg(&self.data_dir)
            .current_dir("/")
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Writes [`ClusterOptions::files`] and [`ClusterOptions::hba`] into the data directory.
    fn write_files(&self) -> Result<(), ClusterError> {
        let hba = self
            .options
            .hba
            .as_ref()
            .map(|h| ("pg_hba.conf".to_string(), h.clone().into_bytes()));
        for (name, content) in self.options.files.iter().cloned().chain(hba) {
            let path = self.data_dir.join(&name);
            let failed = |e: std::io::Error| ClusterError::Step {
                step: "write file",
                detail: format!("{}: {e}", path.display()),
            };
            std::fs::write(&path, &content).map_err(failed)?;
            std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
                .map_err(failed)?;
            if let Some(user) = &self.run_as {
                let status = Command::new("chown")
                    .arg(format!("{user}:"))
                    .arg(&path)
                    .status();
                if !matches!(status, Ok(s) if s.success()) {
                    return Err(ClusterError::Step {
                        step: "chown",
                        detail: path.display().to_string(),
                    });
                }
            }
        }
        Ok(())
    }

    fn wait_ready(&self, limit: Duration) -> Result<(), ClusterError> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(ClusterError::NotReady(limit))
    }

    fn prepare_dirs(&self) -> Result<(), ClusterError> {
        for dir in [&self.data_dir, &self.socket_dir] {
            std::fs::create_dir_all(dir).map_err(|e| ClusterError::Step {
                step: "create directory",
                detail: format!("{}: {e}", dir.display()),
            })?;
            if let Some(user) = &self.run_as {
                let status = Command::new("chown")
                    .arg("-R")
                    .arg(format!("{user}:"))
                    .arg(dir)
                    .status();
                if !matches!(status, Ok(s) if s.success()) {
                    return Err(ClusterError::Step {
                        step: "chown",
                        detail: dir.display().to_string(),
                    });
                }
            }
        }
        // initdb wants the data directory private to its owner.
        std::fs::set_permissions(
            &self.data_dir,
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .map_err(|e| ClusterError::Step {
            step: "chmod",
            detail: e.to_string(),
        })
    }

    fn run(&self, step: &'static str, program: &str, args: &[&str]) -> Result<(), ClusterError> {
        let binary = self.bin_dir.join(program);
        let mut command = match &self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.arg("-u").arg(user).arg("--").arg(&binary);
                c
            }
            None => Command::new(&binary),
        };
        // Run from a directory the service user may enter.
        command.args(args).current_dir("/");
        let output = command.output().map_err(|e| ClusterError::Step {
            step,
            detail: e.to_string(),
        })?;
        if output.status.success() {
            Ok(())
        } else {
            let stderr = String::from_utf8_lossy(&output.stderr);
            let stdout = String::from_utf8_lossy(&output.stdout);
            Err(ClusterError::Step {
                step,
                detail: format!("{} {}", stderr.trim(), stdout.trim())
                    .trim()
                    .chars()
                    .take(2000)
                    .collect(),
            })
        }
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        if let Err(e) = self.stop(StopMode::Fast) {
            tracing::warn!(error = %e, "could not stop the private PostgreSQL cluster");
        }
    }
}

/// `/var/lib/rolecache/root-bot-data-postgres` for `/root/bot/data/postgres`.
fn fallback_dir(asked: &Path) -> PathBuf {
    let name: String = asked
        .to_string_lossy()
        .trim_start_matches('/')
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .collect();
    Path::new(FALLBACK_ROOT).join(name)
}

fn free_port() -> Result<u16, ClusterError> {
    TcpListener::bind(("127.0.0.1", 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| ClusterError::Step {
            step: "find a free port",
            detail: e.to_string(),
        })
}
