//! The clone kept beside a destination, and fetching one ref into it.

use std::cell::Cell;
use std::fs;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use git2::{AutotagOption, Direction, ErrorClass, ErrorCode, FetchOptions, Oid, RemoteCallbacks};

use super::GitOptions;
use super::credentials::{Allowed, Tried};
use crate::Error;
use crate::location::{Transport, redact_text, transport};

/// The config key of the cache that records which remote it is a clone of (the URL without its
/// secret).
const REMOTE_KEY: &str = "deployd.remote";

/// Opens the bare clone at `path` when it is a clone of `identity`; otherwise (absent, another
/// remote, unreadable) creates it anew. Returns the repository and whether it was created.
pub(crate) fn open_cache(path: &Path, identity: &str) -> Result<(git2::Repository, bool), Error> {
    if path.symlink_metadata().is_ok() {
        let reusable = git2::Repository::open_bare(path).ok().filter(|repo| {
            repo.config()
                .and_then(|config| config.get_string(REMOTE_KEY))
                .is_ok_and(|recorded| recorded == identity)
        });
        if let Some(repo) = reusable {
            remove_stale_locks(path);
            return Ok((repo, false));
        }
        tracing::debug!(path = %path.display(), "replacing a clone of another remote");
        crate::destination::remove_tree(path)
            .map_err(|err| Error::io("cannot remove the old clone", path, err))?;
    }
    let fail = |err: git2::Error| Error::Git {
        location: identity.to_owned(),
        detail: format!(
            "cannot create a clone at {}: {}",
            path.display(),
            err.message()
        ),
    };
    let repo = git2::Repository::init_bare(path).map_err(fail)?;
    repo.config()
        .and_then(|mut config| config.set_str(REMOTE_KEY, identity))
        .map_err(fail)?;
    Ok((repo, true))
}

/// Removes the `*.lock` files a killed fetch left in the clone (the caller holds the
/// destination's lock, so no one else is writing there).
fn remove_stale_locks(path: &Path) {
    let walker = walkdir::WalkDir::new(path)
        .into_iter()
        .filter_entry(|entry| entry.file_name() != "objects");
    for entry in walker.flatten() {
        if entry.file_type().is_file() && entry.file_name().as_encoded_bytes().ends_with(b".lock") {
            tracing::debug!(path = %entry.path().display(), "removing a stale git lock");
            let _ = fs::remove_file(entry.path());
        }
    }
}

/// What was resolved and how.
#[derive(Debug)]
pub(crate) struct Resolved {
    /// The full ref name, or the commit as requested.
    pub(crate) reference: String,
    pub(crate) commit: Oid,
    pub(crate) fetched: bool,
    pub(crate) shallow: bool,
    pub(crate) received_objects: usize,
    pub(crate) received_bytes: usize,
}

/// What to fetch.
#[derive(Debug, PartialEq, Eq)]
enum Target {
    /// An advertised ref, and the object it points to.
    Ref { name: String, oid: Oid },
    /// A commit id (maybe abbreviated) that no advertised ref points to.
    Commit(String),
}

/// One fetch of one ref into the clone.
pub(crate) struct Fetcher<'a> {
    pub(crate) repo: &'a git2::Repository,
    /// The URL handed to libgit2 (it may carry a secret).
    pub(crate) url: &'a str,
    /// The location for errors (redacted).
    pub(crate) shown: &'a str,
    pub(crate) options: &'a GitOptions,
    pub(crate) deadline: Instant,
    pub(crate) cancel: &'a AtomicBool,
    timed_out: Cell<bool>,
    asked: Cell<Allowed>,
}

impl<'a> Fetcher<'a> {
    pub(crate) fn new(
        repo: &'a git2::Repository,
        url: &'a str,
        shown: &'a str,
        options: &'a GitOptions,
        deadline: Instant,
        cancel: &'a AtomicBool,
    ) -> Self {
        Self {
            repo,
            url,
            shown,
            options,
            deadline,
            cancel,
            timed_out: Cell::new(false),
            asked: Cell::new(Allowed::default()),
        }
    }

    /// Makes the clone hold `reference` (the remote's default branch when `None`) and returns
    /// the commit it names.
    pub(crate) fn fetch(&self, reference: Option<&str>) -> Result<Resolved, Error> {
        let mut resolved = Resolved {
            reference: reference.unwrap_or("HEAD").to_owned(),
            commit: Oid::ZERO_SHA1,
            fetched: false,
            shallow: false,
            received_objects: 0,
            received_bytes: 0,
        };
        // A full commit id the clone already has: nothing to ask the remote.
        if let Some(reference) = reference
            && reference.len() == 40
            && let Ok(oid) = Oid::from_str(reference)
            && self.repo.find_commit(oid).is_ok()
        {
            resolved.commit = oid;
            return Ok(resolved);
        }

        let mut remote = self
            .repo
            .remote_anonymous(self.url)
            .map_err(|err| self.error(err))?;
        let mut connection = remote
            .connect_auth(Direction::Fetch, Some(self.callbacks()), None)
            .map_err(|err| self.error(err))?;
        let advertised: Vec<(String, Oid)> = connection
            .list()
            .map_err(|err| self.error(err))?
            .iter()
            .map(|head| (head.name().to_owned(), head.oid()))
            .collect();
        let default = connection
            .default_branch()
            .ok()
            .and_then(|name| name.as_str().ok().map(str::to_owned));
        let target = choose(reference, &advertised, default.as_deref()).map_err(|nearest| {
            Error::RefNotFound {
                location: self.shown.to_owned(),
                wanted: reference.unwrap_or("HEAD").to_owned(),
                nearest,
            }
        })?;
        let remote = connection.remote();
        let git = |err: git2::Error| self.error(err);
        match target {
            Target::Ref { name, oid } => {
                resolved.reference = name.clone();
                let local = local_ref(&name);
                let present = self.repo.odb().map_err(git)?.exists(oid);
                if present {
                    self.repo
                        .reference(&local, oid, true, "deployd: already fetched")
                        .map_err(git)?;
                } else if transport(self.url) == Transport::Local {
                    // libgit2's local transport sends what every remote ref reaches, whatever the
                    // refspecs say: keep refs to all of it, so the next fetch sends only what is
                    // new.
                    let refspecs = [
                        format!("+{name}:{local}"),
                        "+refs/heads/*:refs/remotes/origin/*".to_owned(),
                        "+refs/tags/*:refs/tags/*".to_owned(),
                    ];
                    self.download(remote, &refspecs, 0, &mut resolved)?;
                } else {
                    let depth = i32::from(self.options.shallow);
                    self.download(remote, &[format!("+{name}:{local}")], depth, &mut resolved)?;
                }
                resolved.commit = self
                    .repo
                    .find_reference(&local)
                    .and_then(|r| r.peel_to_commit())
                    .map_err(git)?
                    .id();
            }
            Target::Commit(spec) => {
                resolved.reference = spec.clone();
                if let Some(oid) = self.local_commit(&spec) {
                    resolved.commit = oid;
                } else {
                    // Any commit of the history may be the one: all branches and tags, in full.
                    let depth = if self.repo.is_shallow() && transport(self.url) != Transport::Local
                    {
                        i32::MAX // unshallow
                    } else {
                        0
                    };
                    self.download(
                        remote,
                        &[
                            "+refs/heads/*:refs/remotes/origin/*".to_owned(),
                            "+refs/tags/*:refs/tags/*".to_owned(),
                        ],
                        depth,
                        &mut resolved,
                    )?;
                    resolved.shallow = false;
                    resolved.commit =
                        self.local_commit(&spec).ok_or_else(|| Error::RefNotFound {
                            location: self.shown.to_owned(),
                            wanted: spec.clone(),
                            nearest: nearest(&spec, &short_names(&advertised)),
                        })?;
                }
            }
        }
        Ok(resolved)
    }

    fn local_commit(&self, spec: &str) -> Option<Oid> {
        let object = self.repo.revparse_single(spec).ok()?;
        object.peel_to_commit().ok().map(|commit| commit.id())
    }

    /// Fetches `refspecs`, shallow when `depth` > 0 and the server allows it.
    fn download(
        &self,
        remote: &mut git2::Remote<'_>,
        refspecs: &[String],
        depth: i32,
        resolved: &mut Resolved,
    ) -> Result<(), Error> {
        let mut attempt = |remote: &mut git2::Remote<'_>, depth: i32| {
            let mut options = FetchOptions::new();
            options
                .remote_callbacks(self.callbacks())
                .download_tags(AutotagOption::None)
                .update_fetchhead(false)
                .depth(depth);
            let result = remote.fetch(refspecs, Some(&mut options), Some("deployd: fetch"));
            let stats = remote.stats();
            resolved.received_objects += stats.received_objects();
            resolved.received_bytes += stats.received_bytes();
            result
        };
        let mut result = attempt(remote, depth);
        if let Err(err) = &result
            && depth > 0
            && depth < i32::MAX
            && !self.expired()
            && err.message().to_lowercase().contains("shallow")
        {
            tracing::debug!(location = %self.shown, "the server refused a shallow fetch; fetching in full");
            result = attempt(remote, 0);
            resolved.shallow = false;
        } else {
            resolved.shallow = depth > 0 && depth < i32::MAX;
        }
        result.map_err(|err| self.error(err))?;
        resolved.fetched = true;
        Ok(())
    }

    fn expired(&self) -> bool {
        let expired = self.cancel.load(Ordering::Relaxed) || Instant::now() >= self.deadline;
        if expired {
            self.timed_out.set(true);
        }
        expired
    }

    fn callbacks(&self) -> RemoteCallbacks<'_> {
        let mut callbacks = RemoteCallbacks::new();
        let mut tried = Tried::default();
        callbacks.credentials(move |_url, username_from_url, allowed| {
            if self.expired() {
                return Err(git2::Error::new(
                    ErrorCode::Timeout,
                    ErrorClass::Net,
                    "deadline passed",
                ));
            }
            let allowed = Allowed::from(allowed);
            self.asked.set(allowed);
            match self
                .options
                .credentials
                .next(&mut tried, username_from_url, allowed)
            {
                Some(choice) => choice.into_cred(),
                None => Err(git2::Error::new(
                    ErrorCode::Auth,
                    ErrorClass::Net,
                    "no credentials were accepted",
                )),
            }
        });
        callbacks.transfer_progress(|_| !self.expired());
        callbacks.sideband_progress(|_| !self.expired());
        callbacks.certificate_check(|_, _| {
            if self.expired() {
                Err(git2::Error::new(
                    ErrorCode::Timeout,
                    ErrorClass::Net,
                    "deadline passed",
                ))
            } else {
                // libgit2's own checks decide (CA certificates, known_hosts).
                Ok(git2::CertificateCheckStatus::CertificatePassthrough)
            }
        });
        callbacks
    }

    /// Turns a libgit2 error into what happened, without the URL's secret.
    pub(crate) fn error(&self, err: git2::Error) -> Error {
        if self.timed_out.get() || self.expired() {
            return Error::Timeout {
                location: self.shown.to_owned(),
                after: self.options.timeout,
            };
        }
        let started = self.deadline.checked_sub(self.options.timeout);
        match classify(err, self.url, self.shown, self.repo.path(), || {
            self.options.credentials.hint(self.asked.get())
        }) {
            Error::Timeout { location, .. } => Error::Timeout {
                location,
                after: started.map_or(self.options.timeout, |started| started.elapsed()),
            },
            other => other,
        }
    }
}

/// Sorts a libgit2 error into the error kinds a caller can act on.
pub(crate) fn classify(
    err: git2::Error,
    url: &str,
    shown: &str,
    clone: &Path,
    hint: impl FnOnce() -> String,
) -> Error {
    let message = redact_text(err.message(), url);
    let lower = message.to_lowercase();
    let location = shown.to_owned();
    if err.code() == ErrorCode::Auth
        || lower.contains("authentication")
        || lower.contains("status code: 401")
        || lower.contains("status code: 403")
        || lower.contains("permission denied")
    {
        return Error::AuthFailed {
            location,
            detail: format!("{message} ({})", hint()),
        };
    }
    if err.code() == ErrorCode::Certificate {
        return Error::Git {
            location,
            detail: format!(
                "{message} (the server's identity is not trusted: add its SSH host key to \
                 ~/.ssh/known_hosts, or its TLS certificate authority to the system's)"
            ),
        };
    }
    if err.code() == ErrorCode::Timeout || lower.contains("timed out") {
        return Error::Timeout {
            location,
            after: std::time::Duration::ZERO,
        };
    }
    if lower.contains("no space left") || lower.contains("disk quota") {
        return Error::DiskFull {
            path: clone.to_owned(),
            source: std::io::Error::from_raw_os_error(nix::errno::Errno::ENOSPC as i32),
        };
    }
    let unreachable = [
        "failed to connect",
        "connection refused",
        "could not resolve",
        "failed to resolve address",
        "network is unreachable",
        "no route to host",
    ];
    if unreachable.iter().any(|pattern| lower.contains(pattern)) {
        return Error::Unreachable {
            location,
            detail: message,
        };
    }
    let not_found = [
        "could not find repository",
        "not found",
        "not exported",
        "does not appear to be a git repository",
        "status code: 404",
        "no such file or directory",
        "does not exist",
        "no such repository",
    ];
    if not_found.iter().any(|pattern| lower.contains(pattern))
        || (err.code() == ErrorCode::NotFound && err.class() == ErrorClass::Repository)
    {
        return Error::NotFound {
            location,
            detail: message,
        };
    }
    Error::Git {
        location,
        detail: message,
    }
}

/// Picks what to fetch for `reference` among the advertised refs, or returns the nearest names.
///
/// Names are tried as git does: a full ref, then a tag, then a branch; then a commit id (a tip
/// some ref points to is fetched through that ref, so it can be shallow).
fn choose(
    reference: Option<&str>,
    advertised: &[(String, Oid)],
    default_branch: Option<&str>,
) -> Result<Target, Vec<String>> {
    let find = |name: &str| {
        advertised
            .iter()
            .find(|(advertised, _)| advertised == name)
            .map(|(name, oid)| Target::Ref {
                name: name.clone(),
                oid: *oid,
            })
    };
    let Some(reference) = reference else {
        return default_branch
            .and_then(find)
            .or_else(|| find("HEAD"))
            .ok_or_else(Vec::new);
    };
    if reference.starts_with("refs/")
        && let Some(target) = find(reference)
    {
        return Ok(target);
    }
    for candidate in [
        format!("refs/tags/{reference}"),
        format!("refs/heads/{reference}"),
    ] {
        if let Some(target) = find(&candidate) {
            return Ok(target);
        }
    }
    if (4..=40).contains(&reference.len()) && reference.bytes().all(|b| b.is_ascii_hexdigit()) {
        let reference = reference.to_ascii_lowercase();
        let tip = advertised
            .iter()
            .filter(|(name, oid)| name != "HEAD" && oid.to_string().starts_with(&reference))
            .min_by_key(|(name, _)| !name.starts_with("refs/heads/"));
        if let Some((name, oid)) = tip {
            return Ok(match name.strip_suffix("^{}") {
                // The commit an annotated tag points to: fetch the tag.
                Some(tag) => find(tag).unwrap_or(Target::Ref {
                    name: tag.to_owned(),
                    oid: *oid,
                }),
                None => Target::Ref {
                    name: name.clone(),
                    oid: *oid,
                },
            });
        }
        return Ok(Target::Commit(reference));
    }
    Err(nearest(reference, &short_names(advertised)))
}

/// Where a fetched remote ref is kept in the clone.
fn local_ref(remote: &str) -> String {
    if let Some(branch) = remote.strip_prefix("refs/heads/") {
        format!("refs/remotes/origin/{branch}")
    } else if remote.starts_with("refs/tags/") {
        remote.to_owned()
    } else if remote == "HEAD" {
        "refs/remotes/origin/HEAD".to_owned()
    } else {
        format!(
            "refs/deployd/{}",
            remote.strip_prefix("refs/").unwrap_or(remote)
        )
    }
}

/// Branch and tag names as a user writes them.
fn short_names(advertised: &[(String, Oid)]) -> Vec<String> {
    let mut names: Vec<String> = advertised
        .iter()
        .filter(|(name, _)| !name.ends_with("^{}"))
        .filter_map(|(name, _)| {
            name.strip_prefix("refs/heads/")
                .or_else(|| name.strip_prefix("refs/tags/"))
        })
        .map(str::to_owned)
        .collect();
    names.sort();
    names.dedup();
    names
}

/// The (at most three) names closest to `wanted` by edit distance, closest first.
pub(crate) fn nearest(wanted: &str, names: &[String]) -> Vec<String> {
    let mut scored: Vec<(usize, &String)> = names
        .iter()
        .map(|name| (edit_distance(wanted, name), name))
        .collect();
    scored.sort();
    scored
        .into_iter()
        .take(3)
        .map(|(_, name)| name.clone())
        .collect()
}

/// Levenshtein distance, over characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    let mut current = vec![0; b.len() + 1];
    for (i, ca) in a.chars().enumerate() {
        current[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substitution = previous[j] + usize::from(ca != *cb);
            current[j + 1] = substitution.min(previous[j + 1] + 1).min(current[j] + 1);
        }
        std::mem::swap(&mut previous, &mut current);
    }
    previous[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn oid(hex: &str) -> Oid {
        Oid::from_str(&format!("{hex:0<40}")).unwrap()
    }

    fn advertised() -> Vec<(String, Oid)> {
        [
            ("HEAD", "aa"),
            ("refs/heads/main", "aa"),
            ("refs/heads/dev", "bb"),
            ("refs/heads/v1", "c1"),
            ("refs/tags/v1", "cc"),
            ("refs/tags/v1^{}", "dd"),
            ("refs/tags/v1.1", "ee"),
            ("refs/pull/1/head", "ff"),
        ]
        .into_iter()
        .map(|(name, hex)| (name.to_owned(), oid(hex)))
        .collect()
    }

    fn target(name: &str, hex: &str) -> Target {
        Target::Ref {
            name: name.to_owned(),
            oid: oid(hex),
        }
    }

    #[test]
    fn chooses_refs_as_git_does() {
        let refs = advertised();
        for (reference, expected) in [
            (None, target("refs/heads/main", "aa")),
            (Some("dev"), target("refs/heads/dev", "bb")),
            (Some("v1"), target("refs/tags/v1", "cc")),
            (Some("refs/heads/v1"), target("refs/heads/v1", "c1")),
            (Some("refs/pull/1/head"), target("refs/pull/1/head", "ff")),
            (Some("bb00"), target("refs/heads/dev", "bb")),
            (Some("dd000"), target("refs/tags/v1", "cc")),
            (Some("AA00"), target("refs/heads/main", "aa")),
            (Some("1234abc"), Target::Commit("1234abc".into())),
        ] {
            assert_eq!(
                choose(reference, &refs, Some("refs/heads/main")),
                Ok(expected),
                "{reference:?}"
            );
        }
        assert_eq!(
            choose(None, &refs[..1], None),
            Ok(target("HEAD", "aa")),
            "a detached HEAD"
        );
        assert_eq!(choose(None, &[], None), Err(vec![]), "an empty repository");
    }

    #[test]
    fn a_missing_ref_names_the_nearest() {
        assert_eq!(
            choose(Some("v1.2"), &advertised(), None),
            Err(vec!["v1.1".to_owned(), "v1".to_owned(), "dev".to_owned()])
        );
        assert_eq!(
            choose(Some("mian"), &advertised(), None),
            Err(vec!["main".to_owned(), "dev".to_owned(), "v1".to_owned()])
        );
    }

    #[test]
    fn edit_distances() {
        for (a, b, distance) in [
            ("", "", 0),
            ("main", "main", 0),
            ("main", "mian", 2),
            ("v1.2", "v1.1", 1),
            ("", "abc", 3),
            ("kitten", "sitting", 3),
        ] {
            assert_eq!(edit_distance(a, b), distance, "{a} {b}");
        }
    }

    #[test]
    fn keeps_fetched_refs_apart() {
        assert_eq!(local_ref("refs/heads/main"), "refs/remotes/origin/main");
        assert_eq!(local_ref("refs/tags/v1"), "refs/tags/v1");
        assert_eq!(local_ref("HEAD"), "refs/remotes/origin/HEAD");
        assert_eq!(local_ref("refs/pull/1/head"), "refs/deployd/pull/1/head");
    }

    #[test]
    fn classifies_errors() {
        let url = "https://me:s3cret@host/r.git";
        let shown = "https://me:***@host/r.git";
        let check = |code, class, message: &str| {
            classify(
                git2::Error::new(code, class, message),
                url,
                shown,
                Path::new("/data/.svc.git"),
                || "hint".to_owned(),
            )
        };
        let err = check(
            ErrorCode::GenericError,
            ErrorClass::Http,
            "unexpected http status code: 404",
        );
        assert!(matches!(err, Error::NotFound { .. }), "{err}");
        let err = check(
            ErrorCode::Auth,
            ErrorClass::Http,
            "failed for https://me:s3cret@host",
        );
        assert!(matches!(err, Error::AuthFailed { .. }), "{err}");
        assert!(!err.to_string().contains("s3cret"), "{err}");
        let err = check(
            ErrorCode::GenericError,
            ErrorClass::Net,
            "remote error: access denied or repository not exported: /x",
        );
        assert!(matches!(err, Error::NotFound { .. }), "{err}");
        let err = check(
            ErrorCode::GenericError,
            ErrorClass::Os,
            "write: No space left on device",
        );
        assert!(matches!(err, Error::DiskFull { .. }), "{err}");
        let err = check(
            ErrorCode::GenericError,
            ErrorClass::Net,
            "connection timed out",
        );
        assert!(matches!(err, Error::Timeout { .. }), "{err}");
        let err = check(
            ErrorCode::Certificate,
            ErrorClass::Ssh,
            "invalid or unknown remote ssh hostkey",
        );
        assert!(err.to_string().contains("known_hosts"), "{err}");
        let err = check(
            ErrorCode::GenericError,
            ErrorClass::Net,
            "failed to connect to 127.0.0.1: Connection refused",
        );
        assert!(matches!(err, Error::Unreachable { .. }), "{err}");
        let err = check(ErrorCode::GenericError, ErrorClass::Net, "early EOF");
        assert!(matches!(err, Error::Git { .. }), "{err}");
    }
}
