//! Request path normalization (RFC 3986 §6.2.2): percent-encoded unreserved characters
//! decoded, `//` merged, dot segments removed (§5.2.4). Routes match the normalized path, so
//! `/api/../admin` or `/%61dmin` cannot reach a route that `/admin` would not.
use super::h1::body::hex;

/// Writes the normalized form of `path` (no query) into `out` and returns true, or returns
/// false (leaving `out` cleared) when `path` is already normal: the common case costs one scan.
pub fn normalize(path: &str, out: &mut Vec<u8>) -> bool {
    out.clear();
    let p = path.as_bytes();
    let suspicious = p.contains(&b'%')
        || p.windows(2).any(|w| w == b"//" || w == b"/.")
        || p.first() != Some(&b'/');
    if !suspicious {
        return false;
    }
    // Decode the unreserved escapes first: `%2e%2e` is a dot segment too.
    let mut decoded = Vec::with_capacity(p.len());
    let mut i = 0;
    while i < p.len() {
        if p[i] == b'%'
            && i + 2 < p.len()
            && let (Some(h), Some(l)) = (hex(p[i + 1]), hex(p[i + 2]))
        {
            let c = h << 4 | l;
            if c.is_ascii_alphanumeric() || b"-._~".contains(&c) {
                decoded.push(c);
                i += 3;
                continue;
            }
            // Other escapes stay escaped, with uppercase hex (§6.2.2.1).
            let (h, l) = (p[i + 1].to_ascii_uppercase(), p[i + 2].to_ascii_uppercase());
            decoded.extend_from_slice(&[b'%', h, l]);
            i += 3;
            continue;
        }
        decoded.push(p[i]);
        i += 1;
    }
    // Dot-segment removal over `/`-separated segments; empty segments merged.
    out.push(b'/');
    let segments: Vec<&[u8]> = decoded.split(|&c| c == b'/').collect();
    let last = segments.len().saturating_sub(1);
    for (n, seg) in segments.iter().enumerate() {
        match *seg {
            b"" | b"." => {}
            b".." => {
                // Drop the last written segment (the output always starts with `/`).
                out.pop_if(|c| *c == b'/');
                while out.last().is_some_and(|&c| c != b'/') {
                    out.pop();
                }
                if out.is_empty() {
                    out.push(b'/');
                }
            }
            s => {
                out.extend_from_slice(s);
                if n != last {
                    out.push(b'/');
                }
            }
        }
    }
    if out == p {
        out.clear();
        return false;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(p: &str) -> String {
        let mut out = Vec::new();
        if normalize(p, &mut out) { String::from_utf8(out).unwrap() } else { p.to_string() }
    }

    #[test]
    fn rfc_3986_examples_and_tricks() {
        assert_eq!(norm("/a/b/c/./../../g"), "/a/g");
        assert_eq!(norm("/mid/content=5/../6"), "/mid/6");
        assert_eq!(norm("/api/../admin"), "/admin");
        assert_eq!(norm("/%61dmin"), "/admin");
        assert_eq!(norm("/%2e%2e/admin"), "/admin");
        assert_eq!(norm("//admin//x"), "/admin/x");
        assert_eq!(norm("/a/b/"), "/a/b/");
        assert_eq!(norm("/a/./"), "/a/");
        assert_eq!(norm("/a/.."), "/");
        assert_eq!(norm("/../../.."), "/");
        assert_eq!(norm("/a%2fb"), "/a%2Fb", "an escaped slash is not a separator");
        assert_eq!(norm("/plain/path"), "/plain/path");
        assert_eq!(norm("/x%"), "/x%");
    }
}
