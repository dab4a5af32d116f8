//! Credentials for git remotes, from the environment, offered one kind at a time.

use std::fmt;
use std::path::PathBuf;

/// Where the git backend finds credentials when a remote asks for them.
///
/// - HTTPS: a user and password written in the URL (libgit2 offers them first), then the token
///   ([`Credentials::TOKEN_VAR`]) as the password of [`Credentials::USERNAME_VAR`], of the
///   URL's user, or of `x-access-token`.
/// - SSH: the SSH agent (when `SSH_AUTH_SOCK` is set), then the key file
///   ([`Credentials::SSH_KEY_VAR`], with [`Credentials::SSH_PASSPHRASE_VAR`]). The user is the
///   URL's (`git@host:...`), else `git`. Host keys are checked against `~/.ssh/known_hosts`.
///
/// Each kind is offered once; when the remote refuses them all, the sync fails with
/// [`crate::Error::AuthFailed`]. `Debug` shows which kinds are set, never a secret.
#[derive(Clone, Default)]
pub struct Credentials {
    username: Option<String>,
    token: Option<String>,
    ssh_key: Option<PathBuf>,
    ssh_passphrase: Option<String>,
    ssh_agent: bool,
}

impl Credentials {
    /// The token used as an HTTPS password.
    pub const TOKEN_VAR: &str = "DEPLOYD_GIT_TOKEN";
    /// The user that goes with the token (default: the URL's user, else `x-access-token`).
    pub const USERNAME_VAR: &str = "DEPLOYD_GIT_USERNAME";
    /// The path of an SSH private key.
    pub const SSH_KEY_VAR: &str = "DEPLOYD_GIT_SSH_KEY";
    /// The passphrase of that key.
    pub const SSH_PASSPHRASE_VAR: &str = "DEPLOYD_GIT_SSH_PASSPHRASE";

    /// Credentials from deployd's environment: the variables above, and the SSH agent when
    /// `SSH_AUTH_SOCK` is set.
    pub fn from_env() -> Self {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        Self {
            username: var(Self::USERNAME_VAR),
            token: var(Self::TOKEN_VAR),
            ssh_key: var(Self::SSH_KEY_VAR).map(PathBuf::from),
            ssh_passphrase: var(Self::SSH_PASSPHRASE_VAR),
            ssh_agent: var("SSH_AUTH_SOCK").is_some(),
        }
    }

    /// No credentials (only what a URL carries).
    pub fn none() -> Self {
        Self::default()
    }

    /// Uses `token` as the HTTPS password of `username` (default: the URL's user, else
    /// `x-access-token`).
    pub fn with_token(mut self, username: Option<String>, token: impl Into<String>) -> Self {
        self.username = username;
        self.token = Some(token.into());
        self
    }

    /// Uses the SSH private key at `path`.
    pub fn with_ssh_key(mut self, path: impl Into<PathBuf>, passphrase: Option<String>) -> Self {
        self.ssh_key = Some(path.into());
        self.ssh_passphrase = passphrase;
        self
    }

    /// Uses (or not) the SSH agent.
    pub fn with_ssh_agent(mut self, enabled: bool) -> Self {
        self.ssh_agent = enabled;
        self
    }

    /// The next credential to offer, or `None` when every kind that fits was offered.
    pub(crate) fn next(
        &self,
        tried: &mut Tried,
        username_from_url: Option<&str>,
        allowed: Allowed,
    ) -> Option<Choice> {
        let ssh_user = || {
            username_from_url
                .filter(|u| !u.is_empty())
                .or(self.username.as_deref())
                .unwrap_or("git")
                .to_owned()
        };
        if allowed.username && !allowed.ssh_key && !allowed.userpass {
            if tried.username {
                return None;
            }
            tried.username = true;
            return Some(Choice::Username(ssh_user()));
        }
        if allowed.ssh_key {
            if self.ssh_agent && !tried.agent {
                tried.agent = true;
                return Some(Choice::SshAgent { user: ssh_user() });
            }
            if let Some(key) = &self.ssh_key
                && !tried.key
            {
                tried.key = true;
                return Some(Choice::SshKey {
                    user: ssh_user(),
                    key: key.clone(),
                    passphrase: self.ssh_passphrase.clone(),
                });
            }
        }
        if allowed.userpass
            && let Some(token) = &self.token
            && !tried.token
        {
            tried.token = true;
            let user = self
                .username
                .as_deref()
                .or(username_from_url.filter(|u| !u.is_empty()))
                .unwrap_or("x-access-token");
            return Some(Choice::UserPass {
                user: user.to_owned(),
                password: token.clone(),
            });
        }
        None
    }

    /// What to set when every credential was refused, for the error message.
    pub(crate) fn hint(&self, allowed: Allowed) -> String {
        if allowed.ssh_key {
            match (self.ssh_agent, self.ssh_key.is_some()) {
                (false, false) => format!(
                    "no SSH credentials: start an SSH agent (SSH_AUTH_SOCK) or set {}",
                    Self::SSH_KEY_VAR
                ),
                _ => "the SSH agent and key were refused".to_owned(),
            }
        } else if allowed.userpass {
            if self.token.is_some() {
                format!(
                    "the credentials were refused (the URL's, then {})",
                    Self::TOKEN_VAR
                )
            } else {
                format!(
                    "the credentials were refused or missing: set {} (and {})",
                    Self::TOKEN_VAR,
                    Self::USERNAME_VAR
                )
            }
        } else {
            "the server asked for credentials deployd cannot give".to_owned()
        }
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("token", &self.token.as_ref().map(|_| "***"))
            .field("ssh_key", &self.ssh_key)
            .field(
                "ssh_passphrase",
                &self.ssh_passphrase.as_ref().map(|_| "***"),
            )
            .field("ssh_agent", &self.ssh_agent)
            .finish()
    }
}

/// The kinds of credential a remote accepts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Allowed {
    pub(crate) username: bool,
    pub(crate) ssh_key: bool,
    pub(crate) userpass: bool,
}

impl From<git2::CredentialType> for Allowed {
    fn from(types: git2::CredentialType) -> Self {
        Self {
            username: types.contains(git2::CredentialType::USERNAME),
            ssh_key: types.contains(git2::CredentialType::SSH_KEY),
            userpass: types.contains(git2::CredentialType::USER_PASS_PLAINTEXT),
        }
    }
}

/// The kinds already offered during one sync.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Tried {
    username: bool,
    agent: bool,
    key: bool,
    token: bool,
}

/// One credential to offer.
#[derive(Clone, PartialEq, Eq)]
pub(crate) enum Choice {
    Username(String),
    SshAgent {
        user: String,
    },
    SshKey {
        user: String,
        key: PathBuf,
        passphrase: Option<String>,
    },
    UserPass {
        user: String,
        password: String,
    },
}

impl fmt::Debug for Choice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Username(user) => write!(f, "Username({user})"),
            Self::SshAgent { user } => write!(f, "SshAgent({user})"),
            Self::SshKey { user, key, .. } => write!(f, "SshKey({user}, {})", key.display()),
            Self::UserPass { user, .. } => write!(f, "UserPass({user}, ***)"),
        }
    }
}

impl Choice {
    pub(crate) fn into_cred(self) -> Result<git2::Cred, git2::Error> {
        match self {
            Self::Username(user) => git2::Cred::username(&user),
            Self::SshAgent { user } => git2::Cred::ssh_key_from_agent(&user),
            Self::SshKey {
                user,
                key,
                passphrase,
            } => git2::Cred::ssh_key(&user, None, &key, passphrase.as_deref()),
            Self::UserPass { user, password } => git2::Cred::userpass_plaintext(&user, &password),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SSH: Allowed = Allowed {
        username: false,
        ssh_key: true,
        userpass: false,
    };
    const HTTPS: Allowed = Allowed {
        username: false,
        ssh_key: false,
        userpass: true,
    };
    const USERNAME: Allowed = Allowed {
        username: true,
        ssh_key: false,
        userpass: false,
    };

    fn offers(credentials: &Credentials, user: Option<&str>, asks: &[Allowed]) -> Vec<Choice> {
        let mut tried = Tried::default();
        let mut offered = Vec::new();
        for allowed in asks {
            match credentials.next(&mut tried, user, *allowed) {
                Some(choice) => offered.push(choice),
                None => break,
            }
        }
        offered
    }

    #[test]
    fn ssh_tries_the_agent_then_the_key_then_gives_up() {
        let credentials = Credentials::none()
            .with_ssh_agent(true)
            .with_ssh_key("/keys/id", Some("pw".into()));
        assert_eq!(
            offers(&credentials, Some("deploy"), &[SSH, SSH, SSH]),
            [
                Choice::SshAgent {
                    user: "deploy".into()
                },
                Choice::SshKey {
                    user: "deploy".into(),
                    key: "/keys/id".into(),
                    passphrase: Some("pw".into())
                },
            ]
        );
        assert_eq!(
            offers(&Credentials::none(), None, &[USERNAME, SSH]),
            [Choice::Username("git".into())]
        );
    }

    #[test]
    fn https_offers_the_token_once() {
        let credentials = Credentials::none().with_token(None, "t0ken");
        assert_eq!(
            offers(&credentials, Some("me"), &[HTTPS, HTTPS]),
            [Choice::UserPass {
                user: "me".into(),
                password: "t0ken".into()
            }]
        );
        assert_eq!(
            offers(&credentials, None, &[HTTPS]),
            [Choice::UserPass {
                user: "x-access-token".into(),
                password: "t0ken".into()
            }]
        );
        assert!(offers(&Credentials::none(), None, &[HTTPS]).is_empty());
    }

    #[test]
    fn debug_never_shows_a_secret() {
        let credentials = Credentials::none()
            .with_token(Some("me".into()), "t0ken")
            .with_ssh_key("/k", Some("s3cret".into()));
        let shown = format!("{credentials:?}");
        assert!(
            !shown.contains("t0ken") && !shown.contains("s3cret"),
            "{shown}"
        );
        let choice = Choice::UserPass {
            user: "me".into(),
            password: "t0ken".into(),
        };
        assert!(!format!("{choice:?}").contains("t0ken"));
    }
}
