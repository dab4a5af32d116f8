//! Git locations as users write them: `url@ref`, SSH and scp-like addresses, credentials in
//! URLs, and their redaction.

/// Splits `url@ref` into the URL and the ref, on the last `@` after the host part.
///
/// The host part is where an `@` belongs to the URL itself (`git@host`, `user:token@host`), so
/// it is never split there:
///
/// | input | URL | ref |
/// |---|---|---|
/// | `git@github.com:org/repo.git` | the whole input | none |
/// | `git@github.com:org/repo.git@v1` | `git@github.com:org/repo.git` | `v1` |
/// | `ssh://git@host/x.git@v1` | `ssh://git@host/x.git` | `v1` |
/// | `https://user:token@host/repo.git@main` | `https://user:token@host/repo.git` | `main` |
/// | `file:///tmp/r@feature/x` | `file:///tmp/r` | `feature/x` |
/// | `../repo@abc123` | `../repo` | `abc123` |
///
/// An `@` with nothing after it is not a ref: `repo@` is returned whole.
///
/// ```
/// use deployd_sources::split_url_ref;
///
/// assert_eq!(
///     split_url_ref("https://user:token@host/repo.git@main"),
///     ("https://user:token@host/repo.git", Some("main"))
/// );
/// assert_eq!(split_url_ref("git@host:org/repo.git"), ("git@host:org/repo.git", None));
/// ```
pub fn split_url_ref(s: &str) -> (&str, Option<&str>) {
    let path_start = path_start(s);
    match s[path_start..].rfind('@') {
        Some(at) if path_start + at + 1 < s.len() => {
            let at = path_start + at;
            (&s[..at], Some(&s[at + 1..]))
        }
        _ => (s, None),
    }
}

/// Where the path of a git location starts: after the authority of a URL, after the `:` of an
/// scp-like address, at 0 for a plain path.
fn path_start(s: &str) -> usize {
    if let Some(scheme_end) = s.find("://")
        && is_scheme(&s[..scheme_end])
    {
        let authority = scheme_end + 3;
        return s[authority..]
            .find('/')
            .map_or(s.len(), |slash| authority + slash);
    }
    scp_colon(s).map_or(0, |colon| colon + 1)
}

/// The `:` of an scp-like address (`[user@]host:path`): a colon before any slash, with a
/// non-empty host before it.
fn scp_colon(s: &str) -> Option<usize> {
    let colon = s.find(':')?;
    let slash = s.find('/').unwrap_or(s.len());
    let host = &s[..colon];
    let host = host.rsplit_once('@').map_or(host, |(_, host)| host);
    (colon < slash && !host.is_empty()).then_some(colon)
}

fn is_scheme(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
}

/// The kind of transport a git location uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Transport {
    /// A path on this machine or a `file://` URL.
    Local,
    /// `http://` or `https://`.
    Http,
    /// `ssh://` or an scp-like address.
    Ssh,
    /// `git://`.
    Git,
    /// A scheme libgit2 may or may not know.
    Other,
}

pub(crate) fn transport(url: &str) -> Transport {
    if let Some(scheme_end) = url.find("://")
        && is_scheme(&url[..scheme_end])
    {
        return match url[..scheme_end].to_ascii_lowercase().as_str() {
            "file" => Transport::Local,
            "http" | "https" => Transport::Http,
            "ssh" | "ssh+git" | "git+ssh" => Transport::Ssh,
            "git" => Transport::Git,
            _ => Transport::Other,
        };
    }
    if scp_colon(url).is_some() {
        Transport::Ssh
    } else {
        Transport::Local
    }
}

/// The user and password written in a URL's authority (`scheme://user:password@host/...`,
/// or `user@host:path`), if any.
#[cfg_attr(not(feature = "git"), allow(dead_code))]
pub(crate) fn userinfo(url: &str) -> Option<(&str, Option<&str>)> {
    let (start, end) = userinfo_span(url)?;
    let info = &url[start..end];
    Some(match info.split_once(':') {
        Some((user, password)) => (user, Some(password)),
        None => (info, None),
    })
}

/// Byte range of the userinfo (without the `@`).
fn userinfo_span(url: &str) -> Option<(usize, usize)> {
    if let Some(scheme_end) = url.find("://")
        && is_scheme(&url[..scheme_end])
    {
        let authority = scheme_end + 3;
        let authority_end = url[authority..]
            .find('/')
            .map_or(url.len(), |slash| authority + slash);
        let at = url[authority..authority_end].rfind('@')?;
        return Some((authority, authority + at));
    }
    let colon = scp_colon(url)?;
    let at = url[..colon].rfind('@')?;
    Some((0, at))
}

/// The URL with its secret hidden: `https://user:token@host` → `https://user:***@host`; an
/// HTTP(S) user without a password is itself taken for a token (`https://ghp_x@github.com` →
/// `https://***@github.com`). SSH users (`git@host`) are not secrets and are kept.
pub fn redact_url(url: &str) -> String {
    let Some((start, end)) = userinfo_span(url) else {
        return url.to_owned();
    };
    let info = &url[start..end];
    let redacted = match info.split_once(':') {
        Some((user, _)) => format!("{user}:***"),
        None if transport(url) == Transport::Http => "***".to_owned(),
        None => return url.to_owned(),
    };
    format!("{}{}{}", &url[..start], redacted, &url[end..])
}

/// `text` with every secret of `url` (and of any URL inside `text`) replaced by `***`: for
/// messages that come from libgit2 or a server and may quote the URL.
#[cfg_attr(not(feature = "git"), allow(dead_code))]
pub(crate) fn redact_text(text: &str, url: &str) -> String {
    let mut out = text.to_owned();
    if let Some((user, password)) = userinfo(url) {
        let secret = match password {
            Some(password) => Some(password),
            None if transport(url) == Transport::Http => Some(user),
            None => None,
        };
        if let Some(secret) = secret.filter(|s| !s.is_empty()) {
            out = out.replace(secret, "***");
        }
    }
    // Any other `scheme://user:password@` in the text.
    let mut result = String::with_capacity(out.len());
    let mut rest = out.as_str();
    while let Some(scheme_end) = rest.find("://") {
        let authority = scheme_end + 3;
        result.push_str(&rest[..authority]);
        rest = &rest[authority..];
        let end = rest
            .find(|c: char| c == '/' || c.is_whitespace() || c == '\'' || c == '"')
            .unwrap_or(rest.len());
        if let Some(at) = rest[..end].rfind('@') {
            let info = &rest[..at];
            match info.split_once(':') {
                Some((user, _)) => result.push_str(&format!("{user}:***")),
                None => result.push_str(info),
            }
            rest = &rest[at..];
        }
    }
    result.push_str(rest);
    result
}

/// The URL without its password or token: what identifies the remote of a cached clone, so that
/// a rotated token reuses the cache and no secret is stored on disk.
#[cfg_attr(not(feature = "git"), allow(dead_code))]
pub(crate) fn identity(url: &str) -> String {
    redact_url(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(input: &str, url: &str, reference: Option<&str>) {
        assert_eq!(split_url_ref(input), (url, reference), "{input}");
    }

    #[test]
    fn splits_url_and_ref() {
        for (input, url, reference) in [
            (
                "git@github.com:org/repo.git",
                "git@github.com:org/repo.git",
                None,
            ),
            (
                "git@github.com:org/repo.git@v1",
                "git@github.com:org/repo.git",
                Some("v1"),
            ),
            ("ssh://git@host/x.git", "ssh://git@host/x.git", None),
            (
                "ssh://git@host/x.git@v1",
                "ssh://git@host/x.git",
                Some("v1"),
            ),
            (
                "ssh://git@host:2222/x.git@v1.2.3",
                "ssh://git@host:2222/x.git",
                Some("v1.2.3"),
            ),
            (
                "https://user:token@host/repo.git@main",
                "https://user:token@host/repo.git",
                Some("main"),
            ),
            (
                "https://user:token@host/repo.git",
                "https://user:token@host/repo.git",
                None,
            ),
            (
                "https://user:p@ss@host/repo.git",
                "https://user:p@ss@host/repo.git",
                None,
            ),
            (
                "https://user:p@ss@host/repo.git@dev",
                "https://user:p@ss@host/repo.git",
                Some("dev"),
            ),
            ("https://host/repo", "https://host/repo", None),
            ("https://host", "https://host", None),
            ("https://token@host", "https://token@host", None),
            ("https://[::1]:8080/r@x", "https://[::1]:8080/r", Some("x")),
            ("file:///tmp/r@x", "file:///tmp/r", Some("x")),
            ("file:///tmp/r", "file:///tmp/r", None),
            (
                "file:///tmp/r@feature/login",
                "file:///tmp/r",
                Some("feature/login"),
            ),
            (
                "git://127.0.0.1:9418/r.git@0a1b2c3",
                "git://127.0.0.1:9418/r.git",
                Some("0a1b2c3"),
            ),
            ("/srv/repos/app@v2", "/srv/repos/app", Some("v2")),
            ("/srv/repos/app", "/srv/repos/app", None),
            ("../repo@abc123", "../repo", Some("abc123")),
            ("repo", "repo", None),
            ("repo@", "repo@", None),
            ("host:org/repo@main", "host:org/repo", Some("main")),
            ("", "", None),
        ] {
            check(input, url, reference);
        }
    }

    #[test]
    fn knows_the_transport() {
        for (url, expected) in [
            ("file:///tmp/r", Transport::Local),
            ("/tmp/r", Transport::Local),
            ("./r", Transport::Local),
            ("r", Transport::Local),
            ("https://host/r", Transport::Http),
            ("HTTP://host/r", Transport::Http),
            ("ssh://git@host/r", Transport::Ssh),
            ("git@host:org/r.git", Transport::Ssh),
            ("git://host/r", Transport::Git),
            ("s3://bucket/r", Transport::Other),
        ] {
            assert_eq!(transport(url), expected, "{url}");
        }
    }

    #[test]
    fn redacts_secrets() {
        for (url, expected) in [
            (
                "https://user:token@host/repo.git",
                "https://user:***@host/repo.git",
            ),
            (
                "https://ghp_secret@github.com/o/r",
                "https://***@github.com/o/r",
            ),
            ("https://host/repo.git", "https://host/repo.git"),
            ("ssh://git@host/x.git", "ssh://git@host/x.git"),
            ("ssh://git:pw@host/x.git", "ssh://git:***@host/x.git"),
            ("git@host:org/repo.git", "git@host:org/repo.git"),
            ("https://user:p@ss@host/r", "https://user:***@host/r"),
            ("/tmp/a@b/repo", "/tmp/a@b/repo"),
        ] {
            assert_eq!(redact_url(url), expected, "{url}");
        }
    }

    #[test]
    fn redacts_secrets_inside_messages() {
        let url = "https://user:s3cret@host/repo.git";
        let text = "unexpected http status code: 401 for https://user:s3cret@host/repo.git/info/refs (s3cret)";
        let redacted = redact_text(text, url);
        assert!(!redacted.contains("s3cret"), "{redacted}");
        assert!(redacted.contains("https://user:***@host/repo.git/info/refs"));

        let other = redact_text("see http://a:b@c/d and 'ftp://x:y@z'", "/tmp/r");
        assert_eq!(other, "see http://a:***@c/d and 'ftp://x:***@z'");

        let token_as_user = redact_text("failed for ghp_abc", "https://ghp_abc@github.com/o/r");
        assert_eq!(token_as_user, "failed for ***");
    }

    #[test]
    fn reads_userinfo() {
        assert_eq!(
            userinfo("https://user:token@host/r"),
            Some(("user", Some("token")))
        );
        assert_eq!(userinfo("git@host:r"), Some(("git", None)));
        assert_eq!(userinfo("https://host/r@main"), None);
        assert_eq!(userinfo("/tmp/a@b"), None);
    }
}
