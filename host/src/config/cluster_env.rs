//! `cluster.env`: the `KEY=value` file `istioctl x workload entry configure`
//! writes and Istio's start script sources into the agent's environment.
//!
//! istioctl writes one sorted assignment per line and shell-quotes every value
//! (`KEY='value'`, a `'` inside becomes `'"'"'`, an empty value `''`). People
//! edit the file by hand, so this reads the POSIX shell subset an assignment
//! can use: single quotes, double quotes with backslash escapes, unquoted words
//! with backslash escapes, backslash-newline continuations, comments, blank
//! lines and an optional `export ` prefix. What a shell would expand or run
//! (`$VAR`, `` `cmd` ``, `;`, `|`, a second word) is rejected rather than
//! guessed at, naming the line and column.

/// One `KEY=value` assignment, with the line it starts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    pub key: String,
    pub value: String,
    /// 1-based line of the key.
    pub line: usize,
}

/// Where and why `cluster.env` does not parse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyntaxError {
    /// 1-based line.
    pub line: usize,
    /// 1-based column, in characters.
    pub column: usize,
    pub problem: String,
}

/// Parses the whole file into its assignments, in file order. A key assigned
/// twice appears twice; the later one wins, as in a shell.
pub fn parse(text: &str) -> Result<Vec<Assignment>, SyntaxError> {
    let mut parser = Parser::new(text);
    let mut out = Vec::new();
    loop {
        parser.skip_blanks();
        match parser.peek() {
            None => return Ok(out),
            Some('\n') => {
                parser.bump();
            }
            Some('#') => parser.skip_comment(),
            Some(_) => out.push(parser.assignment()?),
        }
    }
}

/// A character cursor that knows its line and column.
struct Parser<'a> {
    text: &'a str,
    /// Byte offset of the next character.
    pos: usize,
    line: usize,
    column: usize,
}

/// A saved position, for errors that point back (e.g. at an opening quote).
#[derive(Clone, Copy)]
struct Mark {
    line: usize,
    column: usize,
}

impl<'a> Parser<'a> {
    fn new(text: &'a str) -> Self {
        Self {
            text: text.strip_prefix('\u{feff}').unwrap_or(text),
            pos: 0,
            line: 1,
            column: 1,
        }
    }

    /// The next character; a CRLF line ending reads as `\n`.
    fn peek(&self) -> Option<char> {
        let rest = &self.text[self.pos..];
        if rest.starts_with("\r\n") {
            return Some('\n');
        }
        rest.chars().next()
    }

    /// The character after the next one, with the same CRLF rule.
    fn peek_second(&self) -> Option<char> {
        let rest = &self.text[self.pos..];
        let first = if rest.starts_with("\r\n") {
            2
        } else {
            rest.chars().next()?.len_utf8()
        };
        let after = &rest[first..];
        if after.starts_with("\r\n") {
            return Some('\n');
        }
        after.chars().next()
    }

    fn bump(&mut self) -> Option<char> {
        let rest = &self.text[self.pos..];
        if rest.starts_with("\r\n") {
            self.pos += 2;
        } else {
            let c = rest.chars().next()?;
            self.pos += c.len_utf8();
            if c != '\n' {
                self.column += 1;
                return Some(c);
            }
        }
        self.line += 1;
        self.column = 1;
        Some('\n')
    }

    fn mark(&self) -> Mark {
        Mark {
            line: self.line,
            column: self.column,
        }
    }

    fn error_at(mark: Mark, problem: impl Into<String>) -> SyntaxError {
        SyntaxError {
            line: mark.line,
            column: mark.column,
            problem: problem.into(),
        }
    }

    fn error(&self, problem: impl Into<String>) -> SyntaxError {
        Self::error_at(self.mark(), problem)
    }

    fn skip_blanks(&mut self) {
        while matches!(self.peek(), Some(' ' | '\t')) {
            self.bump();
        }
    }

    fn skip_comment(&mut self) {
        while !matches!(self.peek(), None | Some('\n')) {
            self.bump();
        }
    }

    /// The text from here to the next blank or line end, for messages.
    fn next_word(&self) -> String {
        self.text[self.pos..]
            .chars()
            .take_while(|c| !c.is_whitespace())
            .take(24)
            .collect()
    }

    /// True if the rest of the text starts a new `KEY=` (or `export KEY=`)
    /// assignment: a quote that runs into such a line was most likely never
    /// closed.
    fn looks_like_assignment(&self) -> bool {
        let rest = self.text[self.pos..].trim_start_matches([' ', '\t']);
        let rest = rest
            .strip_prefix("export")
            .filter(|r| r.starts_with([' ', '\t']))
            .map_or(rest, |r| r.trim_start_matches([' ', '\t']));
        let name_len = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(rest.len());
        name_len > 0
            && !rest.starts_with(|c: char| c.is_ascii_digit())
            && rest[name_len..].starts_with('=')
    }

    /// Reads `[export ]NAME=value [# comment]` up to the end of the line.
    fn assignment(&mut self) -> Result<Assignment, SyntaxError> {
        if self.text[self.pos..].starts_with("export")
            && matches!(
                self.text[self.pos + "export".len()..].chars().next(),
                Some(' ' | '\t')
            )
        {
            for _ in 0.."export".len() {
                self.bump();
            }
            self.skip_blanks();
        }

        let start = self.mark();
        let mut key = String::new();
        while let Some(c) = self.peek() {
            if c.is_ascii_alphanumeric() || c == '_' {
                key.push(c);
                self.bump();
            } else {
                break;
            }
        }
        if key.is_empty() {
            return Err(Self::error_at(
                start,
                format!(
                    "expected KEY=value, found `{}`",
                    self.next_word().chars().next().unwrap_or(' ')
                ),
            ));
        }
        if key.starts_with(|c: char| c.is_ascii_digit()) {
            return Err(Self::error_at(
                start,
                format!("`{key}` is not a variable name (it starts with a digit)"),
            ));
        }
        match self.peek() {
            Some('=') => {
                self.bump();
            }
            None | Some('\n') => {
                return Err(self.error(format!(
                    "expected `=` after `{key}`: each line must be KEY=value"
                )));
            }
            Some(c) => {
                return Err(self.error(format!(
                    "expected `=` after `{key}`, found `{c}`: each line must be KEY=value \
                     (no spaces around `=`)"
                )));
            }
        }

        let value = self.word(&key)?;

        self.skip_blanks();
        match self.peek() {
            None | Some('\n') => {}
            Some('#') => self.skip_comment(),
            Some(_) => {
                return Err(self.error(format!(
                    "unexpected `{}` after the value of {key}: quote a value that contains \
                     spaces, and write one assignment per line",
                    self.next_word()
                )));
            }
        }
        Ok(Assignment {
            key,
            value,
            line: start.line,
        })
    }

    /// Reads one shell word (the value), performing quote removal.
    fn word(&mut self, key: &str) -> Result<String, SyntaxError> {
        let mut value = String::new();
        loop {
            let here = self.mark();
            match self.peek() {
                None | Some('\n' | ' ' | '\t') => return Ok(value),
                Some('\'') => {
                    self.bump();
                    self.single_quoted(here, &mut value)?;
                }
                Some('"') => {
                    self.bump();
                    self.double_quoted(here, key, &mut value)?;
                }
                Some('\\') => {
                    self.bump();
                    match self.peek() {
                        // A line continuation: both characters vanish.
                        Some('\n') => {
                            self.bump();
                        }
                        Some(c) => {
                            value.push(c);
                            self.bump();
                        }
                        None => {
                            return Err(Self::error_at(here, "backslash at the end of the file"));
                        }
                    }
                }
                Some('$') => self.dollar(key, &mut value)?,
                Some('`') => return Err(self.command_substitution(key)),
                Some(c @ (';' | '&' | '|' | '<' | '>' | '(' | ')')) => {
                    return Err(self.error(format!(
                        "unquoted `{c}` in the value of {key}: shell operators are not \
                         supported; single-quote the value"
                    )));
                }
                Some(c) => {
                    value.push(c);
                    self.bump();
                }
            }
        }
    }

    /// After an opening `'`: everything up to the next `'` is literal.
    fn single_quoted(&mut self, open: Mark, value: &mut String) -> Result<(), SyntaxError> {
        loop {
            match self.bump() {
                Some('\'') => return Ok(()),
                Some('\n') if self.looks_like_assignment() => {
                    return Err(Self::error_at(
                        open,
                        format!(
                            "unterminated single quote: the value runs on into line {}, \
                             which looks like the next KEY=value",
                            self.line
                        ),
                    ));
                }
                Some(c) => value.push(c),
                None => return Err(Self::error_at(open, "unterminated single quote")),
            }
        }
    }

    /// After an opening `"`: `\` escapes `$`, `` ` ``, `"`, `\` and newline;
    /// any other backslash is literal. Expansions are rejected.
    fn double_quoted(
        &mut self,
        open: Mark,
        key: &str,
        value: &mut String,
    ) -> Result<(), SyntaxError> {
        loop {
            match self.peek() {
                Some('"') => {
                    self.bump();
                    return Ok(());
                }
                Some('\\') => match self.peek_second() {
                    Some(c @ ('$' | '`' | '"' | '\\')) => {
                        self.bump();
                        self.bump();
                        value.push(c);
                    }
                    Some('\n') => {
                        self.bump();
                        self.bump();
                    }
                    _ => {
                        self.bump();
                        value.push('\\');
                    }
                },
                Some('$') => self.dollar(key, value)?,
                Some('`') => return Err(self.command_substitution(key)),
                Some('\n') => {
                    self.bump();
                    if self.looks_like_assignment() {
                        return Err(Self::error_at(
                            open,
                            format!(
                                "unterminated double quote: the value runs on into line {}, \
                                 which looks like the next KEY=value",
                                self.line
                            ),
                        ));
                    }
                    value.push('\n');
                }
                Some(c) => {
                    self.bump();
                    value.push(c);
                }
                None => return Err(Self::error_at(open, "unterminated double quote")),
            }
        }
    }

    /// A `$`: literal unless it would start an expansion.
    fn dollar(&mut self, key: &str, value: &mut String) -> Result<(), SyntaxError> {
        let expands = matches!(
            self.peek_second(),
            Some(c) if c.is_ascii_alphanumeric()
                || matches!(c, '_' | '{' | '(' | '@' | '*' | '#' | '?' | '$' | '!' | '-')
        );
        if expands {
            return Err(self.error(format!(
                "`$` expansion in the value of {key} is not supported: write the value \
                 itself, or single-quote it for a literal `$`"
            )));
        }
        self.bump();
        value.push('$');
        Ok(())
    }

    fn command_substitution(&self, key: &str) -> SyntaxError {
        self.error(format!(
            "command substitution (`) in the value of {key} is not supported: write the \
             value itself, or single-quote it"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(text: &str) -> String {
        let parsed = parse(text).unwrap_or_else(|e| panic!("{text:?}: {e:?}"));
        assert_eq!(parsed.len(), 1, "{parsed:?}");
        parsed.into_iter().next().unwrap().value
    }

    fn err(text: &str) -> (usize, usize, String) {
        let e = parse(text).expect_err(text);
        (e.line, e.column, e.problem)
    }

    #[test]
    fn istioctl_output() {
        let text = "CANONICAL_REVISION='v2'\n\
                    ISTIO_METAJSON_LABELS='{\"app\":\"ratings\",\"version\":\"v2\"}'\n\
                    ISTIO_META_MESH_ID=''\n\
                    ISTIO_SERVICE_CIDR='*'\n";
        let parsed = parse(text).unwrap();
        let pairs: Vec<_> = parsed
            .iter()
            .map(|a| (a.key.as_str(), a.value.as_str(), a.line))
            .collect();
        assert_eq!(
            pairs,
            [
                ("CANONICAL_REVISION", "v2", 1),
                (
                    "ISTIO_METAJSON_LABELS",
                    r#"{"app":"ratings","version":"v2"}"#,
                    2
                ),
                ("ISTIO_META_MESH_ID", "", 3),
                ("ISTIO_SERVICE_CIDR", "*", 4),
            ]
        );
    }

    #[test]
    fn single_quote_inside_single_quotes() {
        // shellescape.Quote("it's") == `'it'"'"'s'`
        assert_eq!(one(r#"A='it'"'"'s'"#), "it's");
        assert_eq!(one(r#"A=''"'"''"'"''"#), "''");
        assert_eq!(one(r#"A='a\b'"#), r"a\b");
        assert_eq!(one(r#"A='$HOME `x` ; | "q"'"#), r#"$HOME `x` ; | "q""#);
    }

    #[test]
    fn double_quotes_and_escapes() {
        assert_eq!(one(r#"A="say \"hi\"""#), r#"say "hi""#);
        assert_eq!(one(r#"A="c:\temp \\ \$5 \`""#), r"c:\temp \ $5 `");
        assert_eq!(one(r#"A="it's""#), "it's");
        assert_eq!(one(r#"A="costs $ 5""#), "costs $ 5");
        assert_eq!(one("A=\"one\\\ntwo\""), "onetwo");
    }

    #[test]
    fn unquoted_words() {
        assert_eq!(one("A=plain"), "plain");
        assert_eq!(one(r"A=with\ space"), "with space");
        assert_eq!(one(r"A=\'quoted\'"), "'quoted'");
        assert_eq!(one("A=a#b"), "a#b");
        assert_eq!(one("A="), "");
        assert_eq!(one("A=*"), "*");
        assert_eq!(one("A=22,15090,15021,15020"), "22,15090,15021,15020");
        assert_eq!(one("A=mix'ed '\"and\"' parts'"), "mixed and parts");
        assert_eq!(one("A=first\\\nsecond"), "firstsecond");
        assert_eq!(one("A=ünïcode"), "ünïcode");
    }

    #[test]
    fn comments_blank_lines_export_and_line_endings() {
        let text = "# written by istioctl\n\n  \t\nexport A='1' # trailing comment\r\n\
                    \texport\tB=2\n   C=3   \n#D=4\n";
        let parsed = parse(text).unwrap();
        let pairs: Vec<_> = parsed
            .iter()
            .map(|a| (a.key.as_str(), a.value.as_str(), a.line))
            .collect();
        assert_eq!(pairs, [("A", "1", 4), ("B", "2", 5), ("C", "3", 6)]);
        assert!(parse("").unwrap().is_empty());
        assert!(parse("\u{feff}# bom\n").unwrap().is_empty());
        assert_eq!(one("export=1"), "1");
        assert_eq!(parse("A=1\nA=2\n").unwrap()[1].value, "2");
    }

    #[test]
    fn multi_line_quoted_value() {
        assert_eq!(one("A='line one\nline two'\n"), "line one\nline two");
        assert_eq!(one("A=\"line one\nline two\"\n"), "line one\nline two");
    }

    #[test]
    fn unterminated_quotes_name_the_opening_quote() {
        assert_eq!(
            err("A='1'\nB='open\n"),
            (2, 3, "unterminated single quote".into())
        );
        let (line, column, problem) = err("A='1'\nB='open\nC='3'\n");
        assert_eq!((line, column), (2, 3));
        assert!(
            problem.contains("runs on into line 3, which looks like the next KEY=value"),
            "{problem}"
        );
        assert_eq!(err("B=\"open"), (1, 3, "unterminated double quote".into()));
        let (line, column, problem) = err("X=1\nB=\"open\nexport C=3\n");
        assert_eq!((line, column), (2, 3));
        assert!(problem.contains("unterminated double quote"), "{problem}");
    }

    #[test]
    fn lines_that_are_not_assignments() {
        let (line, column, problem) = err("A=1\nISTIO_META_NETWORK: vm-network\n");
        assert_eq!((line, column), (2, 19));
        assert!(problem.contains("expected `=` after `ISTIO_META_NETWORK`, found `:`"));
        let (line, column, problem) = err("A=1\n  JUST_A_NAME\n");
        assert_eq!((line, column), (2, 14));
        assert!(problem.starts_with("expected `=` after `JUST_A_NAME`"));
        assert_eq!(err("-A=1"), (1, 1, "expected KEY=value, found `-`".into()));
        let (_, _, problem) = err("A =1");
        assert!(problem.contains("no spaces around `=`"), "{problem}");
        let (_, column, problem) = err("9A=1");
        assert_eq!(column, 1);
        assert!(problem.contains("starts with a digit"));
    }

    #[test]
    fn second_word_is_rejected() {
        let (line, column, problem) = err("NAME=vm network\n");
        assert_eq!((line, column), (1, 9));
        assert!(
            problem.starts_with("unexpected `network` after the value of NAME"),
            "{problem}"
        );
        let (_, column, _) = err("A=1 B=2");
        assert_eq!(column, 5);
    }

    #[test]
    fn shell_features_we_do_not_run() {
        let (line, column, problem) = err("A='x'\nB=$HOME/bin\n");
        assert_eq!((line, column), (2, 3));
        assert!(problem.contains("`$` expansion"), "{problem}");
        let (_, column, problem) = err(r#"B="${X}""#);
        assert_eq!(column, 4);
        assert!(problem.contains("`$` expansion"));
        let (_, column, problem) = err("B=`hostname`");
        assert_eq!(column, 3);
        assert!(problem.contains("command substitution"));
        let (_, column, problem) = err("B=a;b");
        assert_eq!(column, 4);
        assert!(problem.contains("unquoted `;`"));
        assert!(err("B=x|y").2.contains("unquoted `|`"));
        assert_eq!(err("B=x\\").2, "backslash at the end of the file");
    }

    #[test]
    fn columns_count_characters() {
        let (line, column, _) = err("A='ü' B");
        assert_eq!((line, column), (1, 7));
    }
}
