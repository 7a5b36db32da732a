//! `exec` probes: the command, run without a shell, must exit 0 within the
//! timeout (reference §3.3). Its output (bounded) explains a failure.

use std::process::Stdio;

use tokio::process::Command;

use crate::config::ExecProbe;

/// The most output kept in a failure message (UTF-8 boundaries kept).
pub const MAX_SNIPPET: usize = 256;

/// Runs `argv` directly.
#[derive(Debug, Clone)]
pub struct ExecCheck {
    argv: Vec<String>,
}

impl ExecCheck {
    pub fn new(probe: &ExecProbe) -> Self {
        Self {
            argv: probe.command.clone(),
        }
    }

    /// Runs the command once. The process is killed when the future is
    /// dropped, so the caller's timeout ends it.
    pub async fn check(&self) -> Result<(), String> {
        let Some((program, args)) = self.argv.split_first() else {
            return Err("exec: no command".into());
        };
        let output = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output()
            .await
            .map_err(|error| format!("exec {program}: {error}"))?;
        if output.status.success() {
            return Ok(());
        }
        let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&output.stderr));
        let snippet = snippet(text.trim());
        Err(if snippet.is_empty() {
            format!("exec {program}: {}", output.status)
        } else {
            format!("exec {program}: {}: {snippet}", output.status)
        })
    }
}

/// At most [`MAX_SNIPPET`] bytes of `text`, marked when cut.
fn snippet(text: &str) -> String {
    if text.len() <= MAX_SNIPPET {
        return text.to_string();
    }
    let mut end = MAX_SNIPPET;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::health::probe::{Checker, ProbeOutcome};

    fn checker(argv: &[&str]) -> Checker {
        Checker::Exec(ExecCheck::new(&ExecProbe {
            command: argv.iter().map(|s| s.to_string()).collect(),
        }))
    }

    #[tokio::test]
    async fn exit_zero_is_healthy_anything_else_is_not() {
        let timeout = Duration::from_secs(5);
        assert_eq!(
            checker(&["true"]).check(timeout).await,
            ProbeOutcome::Success
        );
        assert_eq!(
            checker(&["false"]).check(timeout).await,
            ProbeOutcome::Failure("exec false: exit status: 1".into())
        );
        // No shell: the argument is one argv entry, and output is kept.
        let outcome = checker(&["sh", "-c", "echo db down >&2; exit 3"])
            .check(timeout)
            .await;
        assert_eq!(
            outcome,
            ProbeOutcome::Failure("exec sh: exit status: 3: db down".into())
        );
        let outcome = checker(&["/nonexistent/check"]).check(timeout).await;
        assert!(
            outcome.message().starts_with("exec /nonexistent/check: "),
            "{outcome:?}"
        );
    }

    #[tokio::test]
    async fn a_slow_command_times_out_and_is_killed() {
        let started = std::time::Instant::now();
        let outcome = checker(&["sleep", "30"])
            .check(Duration::from_millis(200))
            .await;
        assert_eq!(outcome, ProbeOutcome::Timeout(Duration::from_millis(200)));
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn long_output_is_cut_at_a_char_boundary() {
        let long = "é".repeat(200);
        let cut = snippet(&long);
        assert!(cut.ends_with('…'));
        assert!(cut.len() <= MAX_SNIPPET + '…'.len_utf8());
        assert_eq!(snippet("short"), "short");
    }
}
