//! The first `version = "…";` binding of a container's `default.nix`, read with a small Nix
//! lexer (comments, strings, antiquotation, indented strings): nothing is evaluated, so a
//! version Nix would have to compute is [`Found::Unusable`] with the reason.

use super::Found;

/// The first `version = "…";` binding at any depth of a Nix file.
///
/// "First" is in source order, whatever the nesting. Only a binding counts: not
/// `inherit version;`, not a `{ version ? "…" }:` argument default, not an attribute path
/// such as `passthru.version = …` or an access such as `pkgs.ntfy.version`.
pub(crate) fn from_default_nix(text: &str) -> Found {
    let mut lexer = NixLexer::new(text);
    let mut prev: Option<Token> = None;
    let mut current = lexer.next_token();
    while let Some(token) = current {
        let next = lexer.next_token();
        // A binding's name directly follows `{`, `;` or `let`; that is what sets it apart
        // from `a.version = …`, `inherit version;` and `{ x, version ? … }:`.
        let is_binding = is_version_name(&token.kind)
            && prev.as_ref().is_some_and(|p| opens_binding(&p.kind))
            && next.as_ref().is_some_and(|n| n.kind == Kind::Punct("="));
        if is_binding {
            return binding_value(&mut lexer, token.line);
        }
        prev = Some(token);
        current = next;
    }
    Found::Absent
}
const VERSION: &str = "version";

/// Deeper `${ … }` nesting than this is treated as running to the end of the file, so that
/// hostile input cannot exhaust the stack.
const MAX_NESTING: usize = 128;

#[derive(Debug, PartialEq, Eq)]
enum Kind<'a> {
    Ident(&'a str),
    /// One- or two-character punctuation that matters here: `{`, `}`, `${`, `;`, `=`, `.`, …
    Punct(&'a str),
    Str(NixStr),
    /// Numbers, URIs, comparison and other operators, non-ASCII stray characters.
    Other,
}

#[derive(Debug, PartialEq, Eq)]
enum NixStr {
    /// A terminated `"…"` without antiquotation, unescaped.
    Plain(String),
    Interpolated,
    Indented,
    Unterminated,
}

#[derive(Debug)]
struct Token<'a> {
    kind: Kind<'a>,
    line: usize,
}

fn is_version_name(kind: &Kind) -> bool {
    match kind {
        Kind::Ident(name) => *name == VERSION,
        Kind::Str(NixStr::Plain(name)) => name == VERSION,
        _ => false,
    }
}

fn opens_binding(kind: &Kind) -> bool {
    matches!(kind, Kind::Punct("{" | ";") | Kind::Ident("let"))
}

/// Reads what follows `version =`.
fn binding_value(lexer: &mut NixLexer, line: usize) -> Found {
    let unusable = |why: &str| Found::Unusable(format!("`version` {why} (line {line})"));
    let Some(value) = lexer.next_token() else {
        return unusable("has no value");
    };
    match value.kind {
        Kind::Str(NixStr::Plain(text)) => match lexer.next_token() {
            Some(Token { kind: Kind::Punct(";"), .. }) => {
                if text.is_empty() {
                    unusable("is an empty string")
                } else {
                    Found::Version(text)
                }
            }
            Some(_) => unusable("is bound to an expression, not a string literal"),
            None => unusable("binding is not closed by `;`"),
        },
        Kind::Str(NixStr::Interpolated) => {
            unusable("is bound to a string with an antiquotation (`${…}`), not a plain string literal")
        }
        Kind::Str(NixStr::Indented) => unusable("is bound to an indented string (`''…''`), not a plain string literal"),
        Kind::Str(NixStr::Unterminated) => unusable("is bound to an unterminated string"),
        _ => unusable("is bound to an expression, not a string literal"),
    }
}

/// Just enough of the Nix lexer to know what is code, string or comment.
struct NixLexer<'a> {
    src: &'a str,
    pos: usize,
    line: usize,
    depth: usize,
}

impl<'a> NixLexer<'a> {
    fn new(src: &'a str) -> Self {
        NixLexer { src, pos: 0, line: 1, depth: 0 }
    }

    fn peek(&self, ahead: usize) -> Option<u8> {
        self.src.as_bytes().get(self.pos + ahead).copied()
    }

    fn bump(&mut self) -> Option<u8> {
        let byte = self.peek(0)?;
        self.pos += 1;
        if byte == b'\n' {
            self.line += 1;
        }
        Some(byte)
    }

    fn skip_while(&mut self, keep: impl Fn(u8) -> bool) {
        while self.peek(0).is_some_and(&keep) {
            self.bump();
        }
    }

    fn skip_trivia(&mut self) {
        loop {
            match (self.peek(0), self.peek(1)) {
                (Some(b' ' | b'\t' | b'\r' | b'\n'), _) => {
                    self.bump();
                }
                (Some(b'#'), _) => self.skip_while(|b| b != b'\n'),
                (Some(b'/'), Some(b'*')) => {
                    self.pos += 2;
                    while self.peek(0).is_some() && (self.peek(0), self.peek(1)) != (Some(b'*'), Some(b'/')) {
                        self.bump();
                    }
                    // Past `*/`, or harmlessly past the end of an unterminated comment.
                    self.pos = (self.pos + 2).min(self.src.len());
                }
                _ => return,
            }
        }
    }

    fn next_token(&mut self) -> Option<Token<'a>> {
        self.skip_trivia();
        let line = self.line;
        let start = self.pos;
        let first = self.peek(0)?;
        let second = self.peek(1);
        let kind = match (first, second) {
            (b'"', _) => {
                self.pos += 1;
                Kind::Str(self.string_rest())
            }
            (b'\'', Some(b'\'')) => {
                self.pos += 2;
                Kind::Str(self.indented_rest())
            }
            (b'$', Some(b'{')) => {
                self.pos += 2;
                Kind::Punct(&self.src[start..self.pos])
            }
            (b'a'..=b'z' | b'A'..=b'Z' | b'_', _) => self.word(),
            (b'0'..=b'9', _) => {
                self.skip_while(|b| b.is_ascii_digit() || b == b'.');
                Kind::Other
            }
            // Two-character operators, so that `==` is never read as a binding's `=` and
            // `//*` is the update operator, as in Nix, not a comment.
            (b'=' | b'!' | b'<' | b'>', Some(b'=')) | (b'/', Some(b'/')) => {
                self.pos += 2;
                Kind::Other
            }
            (byte, _) if byte.is_ascii() => {
                self.bump();
                Kind::Punct(&self.src[start..self.pos])
            }
            _ => {
                // One whole non-ASCII character.
                self.pos += 1;
                self.skip_while(|b| (0x80..0xc0).contains(&b));
                Kind::Other
            }
        };
        Some(Token { kind, line })
    }

    /// An identifier, or a URI (`https://…`), which Nix lexes as one token and which may
    /// hold `=`, `?` and `'`.
    fn word(&mut self) -> Kind<'a> {
        let bytes = self.src.as_bytes();
        let start = self.pos;
        let mut end = start;
        while bytes.get(end).is_some_and(|&b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.')) {
            end += 1;
        }
        let scheme_ok = bytes.get(start).is_some_and(u8::is_ascii_alphabetic);
        if scheme_ok && bytes.get(end) == Some(&b':') && bytes.get(end + 1).is_some_and(|&b| is_uri_char(b)) {
            self.pos = end + 1;
            self.skip_while(is_uri_char);
            return Kind::Other;
        }
        // Nix identifiers may hold `'` and `-`: `x''` is a name, not the start of a string.
        self.skip_while(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'\'' | b'-'));
        Kind::Ident(&self.src[start..self.pos])
    }

    /// The rest of a `"…"` string, after the opening quote.
    fn string_rest(&mut self) -> NixStr {
        let mut text = Vec::new();
        let mut interpolated = false;
        loop {
            let Some(byte) = self.bump() else {
                return NixStr::Unterminated;
            };
            match byte {
                b'"' => break,
                b'\\' => match self.bump() {
                    None => return NixStr::Unterminated,
                    Some(b'n') => text.push(b'\n'),
                    Some(b'r') => text.push(b'\r'),
                    Some(b't') => text.push(b'\t'),
                    Some(other) => text.push(other),
                },
                b'$' => match self.peek(0) {
                    Some(b'{') => {
                        self.pos += 1;
                        interpolated = true;
                        self.skip_antiquotation();
                    }
                    // As in Nix, `$` takes the next character along, so `$${` is literal.
                    Some(next) if next != b'"' && next != b'\\' => {
                        self.bump();
                        text.extend([b'$', next]);
                    }
                    _ => text.push(b'$'),
                },
                other => text.push(other),
            }
        }
        if interpolated {
            NixStr::Interpolated
        } else {
            // Only ASCII bytes were replaced, so this is the source's valid UTF-8.
            NixStr::Plain(String::from_utf8_lossy(&text).into_owned())
        }
    }

    /// The rest of a `''…''` string, after the opening `''`.
    fn indented_rest(&mut self) -> NixStr {
        loop {
            let Some(byte) = self.bump() else {
                return NixStr::Unterminated;
            };
            match byte {
                b'\'' if self.peek(0) == Some(b'\'') => {
                    self.pos += 1;
                    match self.peek(0) {
                        // `'''` and `''$` escape one character, `''\` the one after it.
                        Some(b'\'' | b'$') => self.pos += 1,
                        Some(b'\\') => {
                            self.pos += 1;
                            self.bump();
                        }
                        _ => return NixStr::Indented,
                    }
                }
                b'$' => match self.peek(0) {
                    Some(b'{') => {
                        self.pos += 1;
                        self.skip_antiquotation();
                    }
                    Some(b'\'') | None => {}
                    Some(_) => {
                        self.bump();
                    }
                },
                _ => {}
            }
        }
    }

    /// Skips the code of a `${ … }`, after the `${`, up to its closing brace.
    fn skip_antiquotation(&mut self) {
        if self.depth >= MAX_NESTING {
            self.pos = self.src.len();
            return;
        }
        self.depth += 1;
        let mut open = 1usize;
        while let Some(token) = self.next_token() {
            match token.kind {
                Kind::Punct("{" | "${") => open += 1,
                Kind::Punct("}") => {
                    open -= 1;
                    if open == 0 {
                        break;
                    }
                }
                _ => {}
            }
        }
        self.depth -= 1;
    }
}

fn is_uri_char(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || b"%/?:@&=+$,-_.!~*'".contains(&byte)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::version::tests::{unusable, version};

    #[test]
    fn nix_mk_derivation() {
        let text = r#"{ stdenv, fetchurl }:
stdenv.mkDerivation {
  pname = "ntfy";
  version = "2.17.0";
  src = fetchurl { url = "https://example.com/ntfy-2.17.0.tar.gz"; };
}
"#;
        assert_eq!(from_default_nix(text), version("2.17.0"));
    }

    #[test]
    fn nix_let_binding() {
        let text = "let version = \"v1.2\"; in { inherit version; }";
        assert_eq!(from_default_nix(text), version("v1.2"));
    }

    #[test]
    fn nix_let_binding_on_its_own_line() {
        let text = "let\n  version = \"1.0\";\nin\n{ }\n";
        assert_eq!(from_default_nix(text), version("1.0"));
    }

    #[test]
    fn nix_absent() {
        assert_eq!(from_default_nix(""), Found::Absent);
        assert_eq!(from_default_nix("{ pkgs }: pkgs.hello"), Found::Absent);
    }

    #[test]
    fn nix_line_comments_are_skipped() {
        let text = r#"{
  # version = "0.0.1";
  ## old: version = "0.0.2";
  version = "3.0"; # version = "9";
}"#;
        assert_eq!(from_default_nix(text), version("3.0"));
    }

    #[test]
    fn nix_block_comments_are_skipped() {
        let text = r#"{
  /* version = "0.0.1";
     version = "0.0.2"; */
  /**/ /***/ version /* here */ = /* "no" */ "3.1" /* ; */ ;
}"#;
        assert_eq!(from_default_nix(text), version("3.1"));
    }

    #[test]
    fn nix_unterminated_block_comment() {
        assert_eq!(from_default_nix("{ /* version = \"1\"; }"), Found::Absent);
    }

    #[test]
    fn nix_first_binding_wins_even_when_nested_deeper() {
        let text = r#"{ stdenv }:
let
  upstream = { meta = { version = "0.9"; }; };
in
stdenv.mkDerivation {
  version = "1.0";
}"#;
        assert_eq!(from_default_nix(text), version("0.9"));
    }

    #[test]
    fn nix_first_binding_is_decisive_even_when_unusable() {
        let text = r#"{ pkgs }: {
  version = pkgs.ntfy-sh.version;
  passthru = { version = "1.0"; };
}"#;
        assert_eq!(
            from_default_nix(text),
            unusable("`version` is bound to an expression, not a string literal (line 2)")
        );
    }

    #[test]
    fn nix_version_inside_a_string_is_not_a_binding() {
        let text = r#"{
  description = "set version = \"0.1\"; by hand";
  version = "2.0";
}"#;
        assert_eq!(from_default_nix(text), version("2.0"));
    }

    #[test]
    fn nix_version_inside_an_indented_string_is_not_a_binding() {
        let text = r#"{
  script = ''
    echo '${"a"}' ''${version} '''quoted''' ''$ ''\n
    version = "0.1";
  '';
  version = "2.1";
}"#;
        assert_eq!(from_default_nix(text), version("2.1"));
    }

    #[test]
    fn nix_version_inside_an_antiquotation_is_not_a_binding() {
        // Nested strings and braces inside `${}`, including a `}` inside a string.
        let text = r#"{
  name = "x-${ ({ version = "0.1"; s = "}"; }).version }-${ "${ "{" }" }";
  version = "2.2";
}"#;
        assert_eq!(from_default_nix(text), version("2.2"));
    }

    #[test]
    fn nix_escaped_antiquotation_does_not_open_code() {
        let text = r#"{ a = "\${"; b = "$${"; c = ''''${''; version = "2.3"; }"#;
        assert_eq!(from_default_nix(text), version("2.3"));
    }

    #[test]
    fn nix_hash_and_comment_markers_inside_strings() {
        let text = r#"{ d = "C# tool /*"; version = "2.4"; e = "*/"; }"#;
        assert_eq!(from_default_nix(text), version("2.4"));
    }

    #[test]
    fn nix_expression_value() {
        let text = "{ pkgs }:\n{\n  pname = \"ntfy\";\n  version = pkgs.ntfy.version;\n}\n";
        assert_eq!(
            from_default_nix(text),
            unusable("`version` is bound to an expression, not a string literal (line 4)")
        );
    }

    #[test]
    fn nix_function_call_value() {
        let text = "{ lib }: { version = lib.fileContents ./VERSION; }";
        assert_eq!(
            from_default_nix(text),
            unusable("`version` is bound to an expression, not a string literal (line 1)")
        );
    }

    #[test]
    fn nix_string_followed_by_an_operator_is_an_expression() {
        let text = "{ version = \"1.0\" + \"-rc1\"; }";
        assert_eq!(
            from_default_nix(text),
            unusable("`version` is bound to an expression, not a string literal (line 1)")
        );
    }

    #[test]
    fn nix_interpolated_value() {
        let text = "let v = \"1\"; in {\n  version = \"${v}-1\";\n}";
        assert_eq!(
            from_default_nix(text),
            unusable(
                "`version` is bound to a string with an antiquotation (`${…}`), \
                 not a plain string literal (line 2)"
            )
        );
    }

    #[test]
    fn nix_indented_string_value() {
        let text = "{\n\n  version = ''1.0'';\n}";
        assert_eq!(
            from_default_nix(text),
            unusable("`version` is bound to an indented string (`''…''`), not a plain string literal (line 3)")
        );
    }

    #[test]
    fn nix_empty_string_value() {
        assert_eq!(from_default_nix("{ version = \"\"; }"), unusable("`version` is an empty string (line 1)"));
    }

    #[test]
    fn nix_truncated_bindings() {
        assert_eq!(from_default_nix("{ version ="), unusable("`version` has no value (line 1)"));
        assert_eq!(
            from_default_nix("{ version = \"1.0\""),
            unusable("`version` binding is not closed by `;` (line 1)")
        );
        assert_eq!(
            from_default_nix("{ version = \"1.0"),
            unusable("`version` is bound to an unterminated string (line 1)")
        );
    }

    #[test]
    fn nix_value_on_the_next_line_reports_the_name_line() {
        let text = "{\n  version =\n    # pinned\n    \"1.5\";\n  other = 1;\n}";
        assert_eq!(from_default_nix(text), version("1.5"));
        let text = "{\n  version =\n    builtins.readFile ./v;\n}";
        assert_eq!(
            from_default_nix(text),
            unusable("`version` is bound to an expression, not a string literal (line 2)")
        );
    }

    #[test]
    fn nix_inherit_is_not_a_binding() {
        let text = "{ version ? \"1\" }: { inherit version; inherit (src) version; }";
        assert_eq!(from_default_nix(text), Found::Absent);
        let text = "{ src }: { inherit (src) version; meta = { }; version = \"4.0\"; }";
        assert_eq!(from_default_nix(text), version("4.0"));
    }

    #[test]
    fn nix_attribute_access_and_paths_are_not_bindings() {
        let text = r#"{ pkgs }: {
  pname = pkgs.ntfy.version;
  passthru.version = "9.9";
  version.major = 1;
  x = pkgs.ntfy.version or "0";
}"#;
        assert_eq!(from_default_nix(text), Found::Absent);
    }

    #[test]
    fn nix_comparison_is_not_a_binding() {
        // Not valid Nix, but it pins that `==` is not a binding's `=`.
        let text = "{ a = 1; version == \"1\"; b = version == \"2\"; }";
        assert_eq!(from_default_nix(text), Found::Absent);
        let text = "assert version == \"1\"; { version = \"1.1\"; }";
        assert_eq!(from_default_nix(text), version("1.1"));
    }

    #[test]
    fn nix_similar_names_are_not_version() {
        let text = r#"{
  myversion = "1";
  pname = "version";
  version' = "2";
  version-suffix = "3";
  versions = "4";
  _version = "5";
  Version = "6";
}"#;
        assert_eq!(from_default_nix(text), Found::Absent);
    }

    #[test]
    fn nix_function_argument_default_is_not_a_binding() {
        let text = r#"{ stdenv, version ? "1.0", ... }:
stdenv.mkDerivation { pname = "x"; inherit version; }"#;
        assert_eq!(from_default_nix(text), Found::Absent);
        let text = r#"{ version ? "1.0" }@args:
{ version = "2.0"; }"#;
        assert_eq!(from_default_nix(text), version("2.0"));
    }

    #[test]
    fn nix_quoted_attribute_name() {
        assert_eq!(from_default_nix("{ \"version\" = \"1\"; }"), version("1"));
        // A dynamic name is only known after evaluation.
        assert_eq!(from_default_nix("{ \"${\"version\"}\" = \"1\"; ${\"version\"} = \"2\"; }"), Found::Absent);
    }

    #[test]
    fn nix_rec_set() {
        assert_eq!(
            from_default_nix("rec { pname = \"a\"; version = \"0.3\"; name = \"${pname}-${version}\"; }"),
            version("0.3")
        );
    }

    #[test]
    fn nix_crlf_line_ends() {
        let text = "{ stdenv }:\r\n# version = \"0\";\r\nstdenv.mkDerivation {\r\n  version = \"1.2.3\";\r\n}\r\n";
        assert_eq!(from_default_nix(text), version("1.2.3"));
        let text = "{\r\n\r\n  version = src.version;\r\n}\r\n";
        assert_eq!(
            from_default_nix(text),
            unusable("`version` is bound to an expression, not a string literal (line 3)")
        );
    }

    #[test]
    fn nix_line_numbers_count_lines_inside_strings_and_comments() {
        let text = "{\n  a = ''\n\n  '';\n  /*\n  */ b = \"\n\";\n  version = x;\n}";
        assert_eq!(
            from_default_nix(text),
            unusable("`version` is bound to an expression, not a string literal (line 8)")
        );
    }

    #[test]
    fn nix_string_escapes_are_unescaped() {
        assert_eq!(from_default_nix(r#"{ version = "1.0\"beta\\\$x"; }"#), version("1.0\"beta\\$x"));
        assert_eq!(from_default_nix(r#"{ version = "1.0\n"; }"#), version("1.0\n"));
        // `$${` is literal text in Nix, not an antiquotation.
        assert_eq!(from_default_nix(r#"{ version = "1.0$${x}"; }"#), version("1.0$${x}"));
    }

    #[test]
    fn nix_non_ascii() {
        let text = "{ description = \"café — ok\"; version = \"1.0-ü\"; }";
        assert_eq!(from_default_nix(text), version("1.0-ü"));
    }

    #[test]
    fn nix_identifiers_with_quotes_do_not_open_strings() {
        let text = "let x'' = 1; y' = 2; in { a = x''; version = \"5.0\"; }";
        assert_eq!(from_default_nix(text), version("5.0"));
    }

    #[test]
    fn nix_uris_are_single_tokens() {
        // Without URI lexing the `''` would open an indented string.
        let text = "{ src = http://example.com/a''b?version=1; version = \"6.0\"; }";
        assert_eq!(from_default_nix(text), version("6.0"));
        // A lambda `x: …` is not a URI.
        let text = "{ f = x: x; version = \"6.1\"; }";
        assert_eq!(from_default_nix(text), version("6.1"));
    }

    #[test]
    fn nix_update_operator_is_not_a_comment() {
        let text = "{ a = b //* c */ d; version = \"7.0\"; }";
        assert_eq!(from_default_nix(text), version("7.0"));
    }

    #[test]
    fn nix_deep_nesting_does_not_overflow() {
        let depth = 100_000;
        let text = format!("{}{}", "\"${".repeat(depth), "}\"".repeat(depth));
        assert_eq!(from_default_nix(&text), Found::Absent);
    }
}
