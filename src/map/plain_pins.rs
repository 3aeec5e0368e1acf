//! A fast path for the bulk of a big map: a `[tenants]` table of plain
//! `tenant = "shard"` lines, read without the general TOML parser (which costs
//! about 1 µs per line, a second per million pins).
//!
//! Anything it is not sure of returns `None`, and the caller parses the whole
//! document as TOML: the result, and every error message, is then exactly the
//! general parser's.

use std::collections::BTreeMap;

/// The document without its `[tenants]` table, and that table's pins, if the
/// table is there once and every line of it is a plain pin, a comment or
/// blank.
pub(super) fn split(toml: &str) -> Option<(String, BTreeMap<String, String>)> {
    // A table header inside a multi-line string is not a header.
    if toml.contains("\"\"\"") || toml.contains("'''") {
        return None;
    }
    let mut rest = String::with_capacity(toml.len().min(4096));
    let mut pins = Vec::new();
    let mut in_tenants = false;
    let mut seen = false;
    for line in toml.split_inclusive('\n') {
        let content = line.trim();
        if content.starts_with('[') {
            in_tenants = header(content) == Some("tenants");
            if in_tenants {
                if seen {
                    return None; // twice: the parser's error
                }
                seen = true;
                rest.push('\n'); // keep the other lines' numbers
                continue;
            }
        }
        if !in_tenants {
            rest.push_str(line);
            continue;
        }
        rest.push('\n');
        if content.is_empty() || content.starts_with('#') {
            continue;
        }
        let (tenant, shard) = pin(content)?;
        pins.push((tenant.to_owned(), shard.to_owned()));
    }
    if !seen {
        return None;
    }
    // Sorted first (linear for a file already in order), the map is built in
    // bulk instead of by a search per pin.
    pins.sort_by(|a, b| a.0.cmp(&b.0));
    if pins.windows(2).any(|w| w[0].0 == w[1].0) {
        return None; // a duplicate key: the parser's error
    }
    Some((rest, BTreeMap::from_iter(pins)))
}

/// The name of a `[name]` header (with an optional comment after it).
fn header(content: &str) -> Option<&str> {
    let inner = content.strip_prefix('[')?;
    let (name, after) = inner.split_once(']')?;
    let after = after.trim_start();
    (after.is_empty() || after.starts_with('#')).then_some(name.trim())
}

/// `tenant = "shard"`, with a bare or plainly quoted key, a plain basic string
/// and an optional comment.
fn pin(content: &str) -> Option<(&str, &str)> {
    let (key, after) = if let Some(quoted) = content.strip_prefix('"') {
        let (key, after) = quoted.split_once('"')?;
        (plain(key)?, after)
    } else {
        let end = content
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '-'))
            .unwrap_or(content.len());
        (&content[..end], &content[end..])
    };
    if key.is_empty() {
        return None;
    }
    let value = after.trim_start().strip_prefix('=')?.trim_start();
    let (shard, after) = value.strip_prefix('"')?.split_once('"')?;
    let after = after.trim_start();
    if !(after.is_empty() || after.starts_with('#')) {
        return None;
    }
    Some((key, plain(shard)?))
}

/// A string with nothing the TOML parser would read differently (escapes)
/// or refuse (control characters).
fn plain(s: &str) -> Option<&str> {
    (!s.contains(|c: char| c == '\\' || c.is_control())).then_some(s)
}

#[cfg(test)]
mod tests {
    use super::split;
    use proptest::prelude::*;

    fn general(toml: &str) -> Option<BTreeMapOfPins> {
        #[derive(serde::Deserialize)]
        struct Doc {
            #[serde(default)]
            tenants: std::collections::BTreeMap<String, String>,
        }
        toml::from_str::<Doc>(toml).ok().map(|d| d.tenants)
    }
    type BTreeMapOfPins = std::collections::BTreeMap<String, String>;

    #[test]
    fn plain_pins_are_split_out_and_the_rest_keeps_its_line_numbers() {
        let doc = "version = 1\n[shards.a]\nurl = \"postgres://h/a\"\n[tenants] # pins\n\
                   acme = \"a\"\n\"dotted.id\" = \"a\"  # quoted\n\n# note\nx-1 = \"a\"\n[moves.q]\nfrom = \"a\"\n";
        let (rest, pins) = split(doc).unwrap();
        assert_eq!(pins.len(), 3);
        assert_eq!(pins["dotted.id"], "a");
        assert_eq!(rest.lines().count(), doc.lines().count());
        assert!(rest.contains("[moves.q]"));
        assert_eq!(Some(pins), general(doc));
    }

    #[test]
    fn anything_unusual_goes_to_the_general_parser() {
        for doc in [
            "[tenants]\nacme = 'a'\n",                         // literal string
            "[tenants]\n\"a\\u0063me\" = \"a\"\n",             // escape in a key
            "[tenants]\nacme = \"a\"\nacme = \"b\"\n",         // duplicate
            "[tenants]\nacme = \"a\"\n[tenants]\nb = \"a\"\n", // table twice
            "[tenants]\nacme.sub = \"a\"\n",                   // dotted key
            "[tenants]\nacme = { shard = \"a\" }\n",           // not a string
            "x = \"\"\"\n[tenants]\n\"\"\"\n",                 // header in a string
            "version = 1\n",                                   // no pins table
        ] {
            assert!(split(doc).is_none(), "{doc}");
        }
    }

    proptest! {
        /// Plain pins (bare or quoted keys, comments, duplicates) read alike.
        #[test]
        fn plain_pins_read_as_the_parser_reads_them(
            pins in proptest::collection::vec(("[a-z0-9][a-z0-9._-]{0,6}", "[a-z]{1,3}", any::<bool>()), 0..20)
        ) {
            let mut doc = String::from("version = 1\n[tenants]\n");
            for (key, shard, comment) in &pins {
                let key = if key.contains('.') { format!("\"{key}\"") } else { key.clone() };
                doc += &format!("{key} = \"{shard}\"{}\n", if *comment { " # c" } else { "" });
            }
            match split(&doc) {
                Some((_, got)) => prop_assert_eq!(Some(got), general(&doc)),
                None => prop_assert!(general(&doc).is_none(), "declined a valid document: {}", doc),
            }
        }

        /// Whatever the fast path accepts, the general parser reads the same.
        #[test]
        fn the_fast_path_agrees_with_the_parser(
            lines in proptest::collection::vec("[ a-z0-9_.\"=#'-]{0,12}", 0..8)
        ) {
            let doc = format!("version = 1\n[tenants]\n{}\n", lines.join("\n"));
            if let Some((rest, pins)) = split(&doc) {
                prop_assert_eq!(Some(pins), general(&doc));
                prop_assert!(toml::from_str::<toml::Table>(&rest).is_ok());
            }
        }
    }
}
