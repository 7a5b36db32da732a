//! Envoy's own log lines, re-emitted as the agent's `tracing` events so that
//! one stream (journald, `istio.log`) holds both, with one set of levels.
//!
//! Envoy is started with [`LOG_FORMAT`] (`[level][logger] message`) and
//! `--log-format-escaped`, so every event is one line (the escaping also
//! applies to the format's own characters, hence no tabs in it). Lines that
//! do not have that shape (Envoy's usage errors, before its logger exists)
//! are kept whole at the level of the line before them, `info` at first.

use tracing::Level;

/// Envoy's `--log-format`: `[<level>][<logger>] <message>`. The agent's
/// subscriber adds the time.
pub const LOG_FORMAT: &str = "[%l][%n] %v";

/// One parsed line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine<'a> {
    pub level: Level,
    /// Envoy's logger (`main`, `config`, `upstream`, ...); empty when the line
    /// did not come from Envoy's logger.
    pub logger: &'a str,
    pub message: &'a str,
}

/// Envoy's level names (`spdlog`'s long form) as `tracing` levels; `critical`
/// becomes `error`, the highest `tracing` has.
pub fn level(name: &str) -> Option<Level> {
    Some(match name {
        "trace" => Level::TRACE,
        "debug" => Level::DEBUG,
        "info" => Level::INFO,
        "warning" | "warn" => Level::WARN,
        "error" | "critical" => Level::ERROR,
        _ => return None,
    })
}

/// Parses one line (without its newline); `previous` is the level of the
/// line before, for lines without a level of their own.
pub fn parse(line: &str, previous: Level) -> LogLine<'_> {
    let parsed = line.strip_prefix('[').and_then(|rest| {
        let (name, rest) = rest.split_once("][")?;
        let (logger, message) = rest.split_once("] ")?;
        Some(LogLine {
            level: level(name)?,
            logger,
            message,
        })
    });
    parsed.unwrap_or(LogLine {
        level: previous,
        logger: "",
        message: line,
    })
}

/// Emits one line of Envoy's output as a `tracing` event with target
/// `envoy`, the Envoy process id and logger as fields. Returns its level.
pub fn emit(line: &str, previous: Level, pid: u32) -> Level {
    let parsed = parse(line, previous);
    let (logger, message) = (parsed.logger, parsed.message);
    match parsed.level {
        Level::TRACE => tracing::trace!(target: "envoy", pid, logger, "{message}"),
        Level::DEBUG => tracing::debug!(target: "envoy", pid, logger, "{message}"),
        Level::INFO => tracing::info!(target: "envoy", pid, logger, "{message}"),
        Level::WARN => tracing::warn!(target: "envoy", pid, logger, "{message}"),
        Level::ERROR => tracing::error!(target: "envoy", pid, logger, "{message}"),
    }
    parsed.level
}

/// The `-l` argument for a `tracing`-style level name, so that Envoy does not
/// format lines the agent's filter would drop anyway.
pub fn envoy_level(level: Level) -> &'static str {
    match level {
        Level::TRACE => "trace",
        Level::DEBUG => "debug",
        Level::INFO => "info",
        Level::WARN => "warning",
        Level::ERROR => "error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_map_onto_tracing() {
        let line = parse(
            "[warning][config] gRPC config stream closed: 14, no healthy upstream",
            Level::INFO,
        );
        assert_eq!(
            line,
            LogLine {
                level: Level::WARN,
                logger: "config",
                message: "gRPC config stream closed: 14, no healthy upstream",
            }
        );
        assert_eq!(
            parse("[critical][main] boom", Level::INFO).level,
            Level::ERROR
        );
        assert_eq!(parse("[trace][misc] x", Level::INFO).level, Level::TRACE);
        assert_eq!(parse("[debug][misc] x", Level::INFO).level, Level::DEBUG);
        assert_eq!(parse("[error][main] x", Level::INFO).level, Level::ERROR);
        // The message may itself hold brackets.
        assert_eq!(
            parse("[info][main] [a][b] c", Level::WARN).message,
            "[a][b] c"
        );
    }

    #[test]
    fn other_lines_keep_the_previous_level() {
        let line = parse("PARSE ERROR: Argument: --bogus", Level::INFO);
        assert_eq!(line.level, Level::INFO);
        assert_eq!(line.logger, "");
        assert_eq!(line.message, "PARSE ERROR: Argument: --bogus");
        assert_eq!(parse("[loud][main] x", Level::ERROR).level, Level::ERROR);
        assert_eq!(parse("[info] x", Level::ERROR).message, "[info] x");
        assert_eq!(parse("", Level::WARN).level, Level::WARN);
    }

    #[test]
    fn envoy_levels_round_trip() {
        for l in [
            Level::TRACE,
            Level::DEBUG,
            Level::INFO,
            Level::WARN,
            Level::ERROR,
        ] {
            assert_eq!(level(envoy_level(l)), Some(l));
        }
    }
}
