//! `--config FILE`: the agent's flags from a file (the packaged service reads
//! /etc/mrte-collector/mrte-collector.conf), one `flag = value` per line, `#` comments, a flag
//! without a value for a switch. A flag given on the command line, or a secret given in its
//! environment variable, overrides the file's.

use std::{ffi::OsString, os::unix::fs::PermissionsExt as _, path::Path};

use clap::CommandFactory as _;

use crate::cli::Cli;

/// Why the configuration file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading --config {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("--config {path} line {line}: {what}")]
    Line {
        path: String,
        line: usize,
        what: String,
    },
    #[error("--config applies to the agent, not to a subcommand")]
    Subcommand,
}

/// The path `--config FILE` or `--config=FILE` names on the command line, if any.
fn config_path(args: &[OsString]) -> Option<OsString> {
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        if a == "--config" {
            return it.next().cloned();
        }
        if let Some(p) = a.to_str().and_then(|s| s.strip_prefix("--config=")) {
            return Some(p.into());
        }
        if a == "--" {
            break;
        }
    }
    None
}

/// `args` (the process's, program name first) with the configuration file's flags put in
/// before the command line's, except those the command line or the environment already set.
/// Without `--config` the arguments come back as they are. `warn` is told when the file holds
/// a secret that others can read.
pub fn expand(args: Vec<OsString>, warn: impl Fn(&str)) -> Result<Vec<OsString>, ConfigError> {
    let Some(path) = config_path(&args) else {
        return Ok(args);
    };
    if args
        .get(1)
        .and_then(|a| a.to_str())
        .is_some_and(|a| !a.starts_with('-'))
    {
        return Err(ConfigError::Subcommand);
    }
    let path = Path::new(&path);
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: shown.clone(),
        source,
    })?;
    let cmd = Cli::command();
    let on_command_line = |longs: &[&str]| {
        args.iter().skip(1).filter_map(|a| a.to_str()).any(|a| {
            longs.iter().any(|l| {
                a.strip_prefix("--")
                    .and_then(|a| a.strip_prefix(l))
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with('='))
            })
        })
    };
    let mut extra: Vec<OsString> = Vec::new();
    let mut secret = false;
    for (i, raw) in text.lines().enumerate() {
        let fail = |what: String| ConfigError::Line {
            path: shown.clone(),
            line: i + 1,
            what,
        };
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (key, value) = match line.split_once('=') {
            Some((k, v)) => (k.trim(), Some(unquote(v.trim()))),
            None => (line, None),
        };
        let key = key.strip_prefix("--").unwrap_or(key);
        let arg = cmd
            .get_arguments()
            .find(|a| a.get_long() == Some(key))
            .filter(|a| key != "config" && !a.is_hide_set())
            .ok_or_else(|| fail(format!("no agent flag --{key}")))?;
        let longs = arg.get_long_and_visible_aliases().unwrap_or_default();
        if on_command_line(&longs) {
            continue;
        }
        if let Some(env) = arg.get_env() {
            secret = true;
            if std::env::var_os(env).is_some() {
                continue;
            }
        }
        if arg.get_action().takes_values() {
            let value = value.ok_or_else(|| fail(format!("--{key} needs a value")))?;
            extra.push(format!("--{key}={value}").into());
        } else {
            match value.as_deref() {
                None | Some("true") => extra.push(format!("--{key}").into()),
                Some("false") => {}
                Some(v) => {
                    return Err(fail(format!(
                        "--{key} is a switch: true or false, not {v:?}"
                    )));
                }
            }
        }
    }
    if secret
        && let Ok(meta) = std::fs::metadata(path)
        && meta.permissions().mode() & 0o077 != 0
    {
        warn(&format!(
            "{shown} holds a password and others can read it (mode {:o}): chmod 600 it",
            meta.permissions().mode() & 0o777
        ));
    }
    let mut out = Vec::with_capacity(args.len() + extra.len());
    let mut args = args.into_iter();
    out.extend(args.next());
    out.extend(extra);
    out.extend(args);
    Ok(out)
}

/// A value in double quotes loses them (a value may then hold a `#` or spaces at its ends).
fn unquote(v: &str) -> String {
    v.strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or(v)
        .to_owned()
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    fn file(text: &str, mode: u32) -> tempfile::TempPath {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), text).unwrap();
        std::fs::set_permissions(f.path(), std::fs::Permissions::from_mode(mode)).unwrap();
        f.into_temp_path()
    }

    fn parse(conf: &Path, cli: &[&str]) -> Result<(Cli, Vec<String>), ConfigError> {
        let mut args: Vec<OsString> = vec!["mrte-collector".into()];
        args.extend(cli.iter().map(OsString::from));
        args.push("--config".into());
        args.push(conf.into());
        let warned = std::cell::RefCell::new(Vec::new());
        let out = expand(args, |w| warned.borrow_mut().push(w.to_owned()))?;
        Ok((Cli::try_parse_from(out).unwrap(), warned.into_inner()))
    }

    #[test]
    fn the_file_gives_flags_and_the_command_line_overrides_them() {
        let conf = file(
            "# the service's flags\n\
             interface = eth0\n\
             port = 3306,3307\n\
             --rabbitmq_exchange_name = \"mrte fleet\"\n\
             rabbitmq_declare\n\
             bpf_stats = false\n\
             \n\
             read_timeout=250\n",
            0o600,
        );
        let (cli, warned) = parse(&conf, &["--read_timeout=50"]).unwrap();
        assert_eq!(cli.run.interface.as_deref(), Some("eth0"));
        assert_eq!(cli.run.capture.port, vec![3306, 3307]);
        assert_eq!(cli.run.rabbitmq.rabbitmq_exchange_name, "mrte fleet");
        assert!(cli.run.rabbitmq.rabbitmq_declare);
        assert!(!cli.run.bpf_stats);
        assert_eq!(cli.run.read_timeout, 50, "the command line wins");
        assert!(warned.is_empty(), "{warned:?}");
        let (cli, _) = parse(&conf, &["--interface", "lo", "--port=13306"]).unwrap();
        assert_eq!(cli.run.interface.as_deref(), Some("lo"));
        assert_eq!(cli.run.capture.port, vec![13306]);
    }

    #[test]
    fn a_readable_secret_is_told_and_bad_lines_are_refused_by_number() {
        let conf = file("interface = lo\nrabbitmq_password = s3cret\n", 0o644);
        let (cli, warned) = parse(&conf, &[]).unwrap();
        assert_eq!(cli.run.rabbitmq.rabbitmq_password, "s3cret");
        assert_eq!(warned.len(), 1, "{warned:?}");
        assert!(warned[0].contains("chmod 600"), "{warned:?}");
        for (text, what) in [
            (
                "interface = lo\nno_such_flag = 1\n",
                "line 2: no agent flag --no_such_flag",
            ),
            ("port\n", "line 1: --port needs a value"),
            (
                "rabbitmq_declare = yes\n",
                "line 1: --rabbitmq_declare is a switch",
            ),
            ("tls_offsets\n", "line 1: no agent flag --tls_offsets"),
        ] {
            let conf = file(text, 0o600);
            let e = parse(&conf, &[]).expect_err(text).to_string();
            assert!(e.contains(what), "{e}");
        }
        let e = expand(
            vec![
                "mrte-collector".into(),
                "inspect".into(),
                "--config=x".into(),
            ],
            |_| {},
        )
        .unwrap_err();
        assert!(matches!(e, ConfigError::Subcommand));
    }
}
