//! The first `ARG CONTAINER_APP_VERSION=…` of a container's Dockerfile: parser directives,
//! continuations, quotes, several ARGs in one line, heredocs skipped.

use super::Found;

/// The first `ARG CONTAINER_APP_VERSION=…` in a Dockerfile.
///
/// The first such ARG is decisive: when it has no usable default, later ones are not
/// consulted, so the version always comes from the declaration a reader sees first.
pub(crate) fn from_dockerfile(text: &str) -> Found {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let lines: Vec<&str> = text.split('\n').map(|line| line.strip_suffix('\r').unwrap_or(line)).collect();

    // Parser directives only count before any other line.
    let mut escape = '\\';
    let mut i = 0;
    while let Some((key, value)) = lines.get(i).and_then(|line| parser_directive(line)) {
        if key.eq_ignore_ascii_case("escape") {
            match value {
                "`" => escape = '`',
                "\\" => escape = '\\',
                _ => {}
            }
        }
        i += 1;
    }

    while let Some(&line) = lines.get(i) {
        i += 1;
        if is_blank_or_comment(line) {
            continue;
        }
        let line_no = i;
        let mut instruction = String::new();
        let mut current = line;
        loop {
            let Some(body) = continued(current, escape) else {
                instruction.push_str(current);
                break;
            };
            instruction.push_str(body);
            // Docker drops comment and blank lines inside a continued instruction.
            while lines.get(i).is_some_and(|l| is_blank_or_comment(l)) {
                i += 1;
            }
            let Some(&next) = lines.get(i) else { break };
            i += 1;
            current = next;
        }

        let words = split_words(&instruction, escape);
        let Some((keyword, args)) = words.split_first() else {
            continue;
        };
        if keyword.eq_ignore_ascii_case("ARG") {
            if let Some(found) = arg_default(args, escape, line_no) {
                return found;
            }
        } else if ["RUN", "COPY", "ADD"].iter().any(|k| keyword.eq_ignore_ascii_case(k)) {
            // A heredoc body is file content or a script, not Dockerfile instructions.
            i = skip_heredocs(&lines, i, args);
        }
    }
    Found::Absent
}
const ARG_NAME: &str = "CONTAINER_APP_VERSION";

fn is_blank_or_comment(line: &str) -> bool {
    let line = line.trim_start();
    line.is_empty() || line.starts_with('#')
}

/// `# key=value` at the top of a Dockerfile.
fn parser_directive(line: &str) -> Option<(&str, &str)> {
    let rest = line.trim().strip_prefix('#')?.trim_start();
    let (key, value) = rest.split_once('=')?;
    let key = key.trim_end();
    let well_formed =
        key.starts_with(|c: char| c.is_ascii_alphabetic()) && key.chars().all(|c| c.is_ascii_alphanumeric());
    well_formed.then_some((key, value.trim()))
}

/// The line without its trailing escape character, when it continues on the next line.
fn continued(line: &str, escape: char) -> Option<&str> {
    line.trim_end_matches([' ', '\t']).strip_suffix(escape)
}

/// Splits an instruction into words at unquoted whitespace, keeping quotes and escapes.
fn split_words(text: &str, escape: char) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut quote: Option<char> = None;
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == escape && quote != Some('\'') {
            word.push(c);
            word.extend(chars.next());
            continue;
        }
        match quote {
            Some(q) => {
                if c == q {
                    quote = None;
                }
                word.push(c);
            }
            None if c.is_whitespace() => {
                if !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
            }
            None => {
                if c == '"' || c == '\'' {
                    quote = Some(c);
                }
                word.push(c);
            }
        }
    }
    if !word.is_empty() {
        words.push(word);
    }
    words
}

/// What an `ARG` instruction says about `CONTAINER_APP_VERSION`, if it names it.
fn arg_default(args: &[String], escape: char, line: usize) -> Option<Found> {
    let unusable = |why: &str| Found::Unusable(format!("`ARG {ARG_NAME}` {why} (line {line})"));
    for word in args {
        let (name, value) = match word.split_once('=') {
            Some((name, value)) => (name, Some(value)),
            None => (word.as_str(), None),
        };
        if name != ARG_NAME {
            continue;
        }
        return Some(match value.map(|raw| unquote(raw, escape)) {
            None => unusable("has no default"),
            Some(Ok(value)) if value.is_empty() => unusable("has an empty default"),
            Some(Ok(value)) => Found::Version(value),
            Some(Err(why)) => unusable(why),
        });
    }
    None
}

/// Removes shell quoting from an ARG default, as Docker does; a variable reference makes
/// the default something only a build can compute.
fn unquote(raw: &str, escape: char) -> Result<String, &'static str> {
    const UNTERMINATED: &str = "default has an unterminated quote";
    const VARIABLE: &str = "default refers to a build variable (`$…`), not a literal";
    let starts_variable = |next: Option<&char>| next.is_some_and(|&c| c == '{' || c == '_' || c.is_alphanumeric());

    let mut out = String::new();
    let mut chars = raw.chars().peekable();
    while let Some(c) = chars.next() {
        if c == escape {
            out.extend(chars.next());
            continue;
        }
        match c {
            '\'' => loop {
                match chars.next() {
                    None => return Err(UNTERMINATED),
                    Some('\'') => break,
                    Some(c) => out.push(c),
                }
            },
            '"' => loop {
                match chars.next() {
                    None => return Err(UNTERMINATED),
                    Some('"') => break,
                    Some(c) if c == escape => match chars.peek() {
                        // Inside double quotes the escape only works on these.
                        Some(&next) if next == '"' || next == '$' || next == escape => {
                            out.push(next);
                            chars.next();
                        }
                        _ => out.push(c),
                    },
                    Some('$') if starts_variable(chars.peek()) => return Err(VARIABLE),
                    Some(c) => out.push(c),
                }
            },
            '$' if starts_variable(chars.peek()) => return Err(VARIABLE),
            _ => out.push(c),
        }
    }
    Ok(out)
}

/// Skips the bodies of the heredocs (`<<EOF`, `<<-"EOF"`) an instruction opens; returns
/// the index of the first line after them.
fn skip_heredocs(lines: &[&str], mut i: usize, args: &[String]) -> usize {
    for (name, strip_tabs) in args.iter().filter_map(|word| heredoc(word)) {
        while let Some(&line) = lines.get(i) {
            i += 1;
            let line = if strip_tabs { line.trim_start_matches('\t') } else { line };
            if line == name {
                break;
            }
        }
    }
    i
}

/// The terminator a word such as `<<EOF`, `<<-'EOF'` or `3<<EOF` opens a heredoc with, and
/// whether its body's leading tabs are stripped.
fn heredoc(word: &str) -> Option<(&str, bool)> {
    let rest = word.trim_start_matches(|c: char| c.is_ascii_digit()).strip_prefix("<<")?;
    let (rest, strip_tabs) = match rest.strip_prefix('-') {
        Some(rest) => (rest, true),
        None => (rest, false),
    };
    let name = rest.trim_matches(|c| c == '"' || c == '\'');
    (!name.is_empty() && !name.contains('<')).then_some((name, strip_tabs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::version::tests::{unusable, version};

    #[test]
    fn docker_plain_default() {
        let text = "FROM alpine:3.20\nARG CONTAINER_APP_VERSION=2.17.0\nRUN echo\n";
        assert_eq!(from_dockerfile(text), version("2.17.0"));
    }

    #[test]
    fn docker_quoted_defaults() {
        assert_eq!(from_dockerfile("ARG CONTAINER_APP_VERSION=\"2.17.0\""), version("2.17.0"));
        assert_eq!(from_dockerfile("ARG CONTAINER_APP_VERSION='2.17.0'"), version("2.17.0"));
        assert_eq!(from_dockerfile(r#"ARG CONTAINER_APP_VERSION="2.0\"x""#), version("2.0\"x"));
        // Single quotes keep `$` literal.
        assert_eq!(from_dockerfile("ARG CONTAINER_APP_VERSION='1$x'"), version("1$x"));
    }

    #[test]
    fn docker_leading_v_is_kept() {
        assert_eq!(from_dockerfile("ARG CONTAINER_APP_VERSION=v2.17.0"), version("v2.17.0"));
    }

    #[test]
    fn docker_without_default() {
        let text = "FROM alpine\n\nARG CONTAINER_APP_VERSION\n";
        assert_eq!(from_dockerfile(text), unusable("`ARG CONTAINER_APP_VERSION` has no default (line 3)"));
    }

    #[test]
    fn docker_first_arg_is_decisive() {
        let text = "ARG CONTAINER_APP_VERSION\nFROM alpine\nARG CONTAINER_APP_VERSION=1.0\n";
        assert_eq!(from_dockerfile(text), unusable("`ARG CONTAINER_APP_VERSION` has no default (line 1)"));
        let text = "ARG CONTAINER_APP_VERSION=1.0\nFROM alpine\nARG CONTAINER_APP_VERSION=2.0\n";
        assert_eq!(from_dockerfile(text), version("1.0"));
    }

    #[test]
    fn docker_empty_default() {
        assert_eq!(
            from_dockerfile("ARG CONTAINER_APP_VERSION="),
            unusable("`ARG CONTAINER_APP_VERSION` has an empty default (line 1)")
        );
        assert_eq!(
            from_dockerfile("ARG CONTAINER_APP_VERSION=\"\""),
            unusable("`ARG CONTAINER_APP_VERSION` has an empty default (line 1)")
        );
    }

    #[test]
    fn docker_variable_default() {
        for text in [
            "ARG CONTAINER_APP_VERSION=${BASE}",
            "ARG CONTAINER_APP_VERSION=$BASE",
            "ARG CONTAINER_APP_VERSION=\"1.${MINOR}\"",
        ] {
            assert_eq!(
                from_dockerfile(text),
                unusable(
                    "`ARG CONTAINER_APP_VERSION` default refers to a build variable (`$…`), \
                     not a literal (line 1)"
                ),
                "{text}"
            );
        }
    }

    #[test]
    fn docker_unterminated_quote() {
        assert_eq!(
            from_dockerfile("ARG CONTAINER_APP_VERSION=\"1.0"),
            unusable("`ARG CONTAINER_APP_VERSION` default has an unterminated quote (line 1)")
        );
    }

    #[test]
    fn docker_lower_case_instruction_and_indentation() {
        assert_eq!(from_dockerfile("FROM alpine\n  arg CONTAINER_APP_VERSION=3.0\n"), version("3.0"));
        assert_eq!(from_dockerfile("\tArg CONTAINER_APP_VERSION=3.1"), version("3.1"));
    }

    #[test]
    fn docker_argument_name_is_case_sensitive() {
        assert_eq!(from_dockerfile("ARG container_app_version=1.0"), Found::Absent);
    }

    #[test]
    fn docker_several_args_in_one_instruction() {
        assert_eq!(from_dockerfile("ARG A=1 CONTAINER_APP_VERSION=2 B"), version("2"));
        assert_eq!(
            from_dockerfile("ARG A=\"x y\" CONTAINER_APP_VERSION"),
            unusable("`ARG CONTAINER_APP_VERSION` has no default (line 1)")
        );
    }

    #[test]
    fn docker_similar_names_do_not_match() {
        let text = "ARG CONTAINER_APP_VERSION_SUFFIX=-rc\nARG MY_CONTAINER_APP_VERSION=1\n\
                    ENV CONTAINER_APP_VERSION=2\nLABEL CONTAINER_APP_VERSION=3\n";
        assert_eq!(from_dockerfile(text), Found::Absent);
    }

    #[test]
    fn docker_comments_are_skipped() {
        let text = "# ARG CONTAINER_APP_VERSION=0.1\n  # ARG CONTAINER_APP_VERSION\nARG CONTAINER_APP_VERSION=0.2\n";
        assert_eq!(from_dockerfile(text), version("0.2"));
    }

    #[test]
    fn docker_continuation_lines() {
        let text = "FROM alpine\nARG A=1 \\\n    # a comment\n\n    CONTAINER_APP_VERSION \\  \n    B=2\n";
        assert_eq!(from_dockerfile(text), unusable("`ARG CONTAINER_APP_VERSION` has no default (line 2)"));
        let text = "ARG \\\n  CONTAINER_APP_VERSION=4.0\n";
        assert_eq!(from_dockerfile(text), version("4.0"));
        // Docker joins continued lines as they are, without a space.
        let text = "ARG CONTAINER_APP_VERSION=4.\\\n1\n";
        assert_eq!(from_dockerfile(text), version("4.1"));
    }

    #[test]
    fn docker_continued_run_does_not_hide_or_fake_an_arg() {
        let text = "RUN echo \\\n  ARG CONTAINER_APP_VERSION=0.0\nARG CONTAINER_APP_VERSION=5.0\n";
        assert_eq!(from_dockerfile(text), version("5.0"));
    }

    #[test]
    fn docker_escape_directive() {
        let text = "# syntax=docker/dockerfile:1\n# escape=`\nFROM alpine\nARG A=1 `\n    CONTAINER_APP_VERSION=6.0\n";
        assert_eq!(from_dockerfile(text), version("6.0"));
        // Too late to be a directive: just a comment.
        let text = "FROM alpine\n# escape=`\nARG A=1 `\nARG CONTAINER_APP_VERSION=6.1\n";
        assert_eq!(from_dockerfile(text), version("6.1"));
    }

    #[test]
    fn docker_heredoc_bodies_are_skipped() {
        let text = "FROM alpine\nRUN <<EOF\ncat > Dockerfile.inner <<'X'\nARG CONTAINER_APP_VERSION=0.0\nX\nEOF\n\
                    COPY <<-\"A\" <<B /dst/\n\tARG CONTAINER_APP_VERSION=0.1\n\tA\nARG CONTAINER_APP_VERSION=0.2\nB\n\
                    ARG CONTAINER_APP_VERSION=7.0\n";
        assert_eq!(from_dockerfile(text), version("7.0"));
        // `<<` inside quotes is not a heredoc.
        let text = "RUN echo \"a <<EOF\"\nARG CONTAINER_APP_VERSION=7.1\n";
        assert_eq!(from_dockerfile(text), version("7.1"));
    }

    #[test]
    fn docker_onbuild_arg_is_not_this_build() {
        assert_eq!(from_dockerfile("ONBUILD ARG CONTAINER_APP_VERSION=1.0"), Found::Absent);
    }

    #[test]
    fn docker_crlf_line_ends() {
        let text = "\u{feff}FROM alpine\r\n# ARG CONTAINER_APP_VERSION=0\r\nARG CONTAINER_APP_VERSION=8.0\r\n";
        assert_eq!(from_dockerfile(text), version("8.0"));
        let text = "FROM alpine\r\nARG A=1 \\\r\n  CONTAINER_APP_VERSION=\"8.1\"\r\n";
        assert_eq!(from_dockerfile(text), version("8.1"));
        let text = "FROM alpine\r\n\r\nARG CONTAINER_APP_VERSION\r\n";
        assert_eq!(from_dockerfile(text), unusable("`ARG CONTAINER_APP_VERSION` has no default (line 3)"));
    }

    #[test]
    fn docker_absent() {
        assert_eq!(from_dockerfile(""), Found::Absent);
        assert_eq!(from_dockerfile("FROM alpine\nARG\nARG OTHER=1\n"), Found::Absent);
    }
}
