//! The errors of `kubectl parley`. Each names the object (kind, name, namespace) it is about.

use std::path::PathBuf;

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The kubeconfig named by `--kubeconfig` could not be read.
    #[error("unable to read the kubeconfig {path}")]
    ReadKubeconfig {
        /// The file.
        path: PathBuf,
        /// kube's error.
        #[source]
        source: kube::config::KubeconfigError,
    },
    /// The kubeconfig (or the context chosen in it) is not usable.
    #[error("unable to load the kubeconfig{}", context.as_deref().map(|c| format!(" (context {c})")).unwrap_or_default())]
    LoadKubeconfig {
        /// The context asked for with `--context`, if any.
        context: Option<String>,
        /// kube's error.
        #[source]
        source: kube::config::KubeconfigError,
    },
    /// Neither `KUBECONFIG`, `~/.kube/config` nor an in-cluster configuration was found.
    #[error("unable to find a Kubernetes configuration (KUBECONFIG, ~/.kube/config or in-cluster)")]
    InferConfig(#[source] kube::config::InferConfigError),
    /// The client could not be built from the configuration.
    #[error("unable to create a Kubernetes client")]
    Client(#[source] kube::Error),
    /// The namespace holds no ChatCluster.
    #[error("no ChatCluster in namespace {namespace}")]
    NoChatCluster {
        /// The namespace searched.
        namespace: String,
    },
    /// The namespace holds several ChatClusters and none was named.
    #[error("{} ChatClusters in namespace {namespace} ({}): name one, as in `kubectl parley status {}`",
        names.len(), names.join(", "), names.first().map(String::as_str).unwrap_or_default())]
    SeveralChatClusters {
        /// The namespace searched.
        namespace: String,
        /// The ChatClusters found.
        names: Vec<String>,
    },
    /// An object does not exist.
    #[error("{kind} {name} not found in namespace {namespace}")]
    NotFound {
        /// Its kind.
        kind: &'static str,
        /// Its name.
        name: String,
        /// Its namespace.
        namespace: String,
    },
    /// The kind is not served: its CRD is not installed.
    #[error("the API server does not serve {kind} (is the Parley CRD installed? `parley-operator crd | kubectl apply --server-side -f -`)")]
    KindNotServed {
        /// The kind.
        kind: &'static str,
    },
    /// The credentials may not do this.
    #[error("forbidden to {verb} {target} in namespace {namespace}: {message}")]
    Forbidden {
        /// What was attempted (`get`, `list`, `patch`).
        verb: &'static str,
        /// The object (`Region eu`) or the kind (`Regions`).
        target: String,
        /// The namespace.
        namespace: String,
        /// The API server's message.
        message: String,
    },
    /// Any other API failure.
    #[error("failed to {verb} {target} in namespace {namespace}")]
    Api {
        /// What was attempted.
        verb: &'static str,
        /// The object or the kind.
        target: String,
        /// The namespace.
        namespace: String,
        /// kube's error.
        #[source]
        source: Box<kube::Error>,
    },
    /// `drain` was given a pod that is not a Parley gateway.
    #[error(
        "pod {pod} in namespace {namespace} is not a Parley gateway ({why}); `kubectl parley drain` only drains \
         gateway pods (labels app.kubernetes.io/component=gateway and parley.dev/cluster)"
    )]
    NotAGateway {
        /// The pod.
        pod: String,
        /// The namespace.
        namespace: String,
        /// Which label is missing or different.
        why: String,
    },
    /// The report could not be rendered as JSON.
    #[error("failed to render the status as JSON")]
    Json(#[source] serde_json::Error),
}

impl Error {
    /// Maps an API error on `target` (an object such as `Region eu`, or a kind) to [`Error::NotFound`],
    /// [`Error::Forbidden`] or [`Error::Api`].
    pub fn from_api(
        source: kube::Error,
        verb: &'static str,
        kind: &'static str,
        name: Option<&str>,
        namespace: &str,
    ) -> Error {
        let target = match name {
            Some(name) => format!("{kind} {name}"),
            None => format!("{kind}s"),
        };
        if let kube::Error::Api(status) = &source {
            match (status.code, name) {
                // A missing object's Status names it; a kind that is not served answers 404 without a name (or
                // without a Status at all: "404 page not found").
                (404, Some(name)) if status.details.as_ref().is_some_and(|d| !d.name.is_empty()) => {
                    return Error::NotFound { kind, name: name.to_owned(), namespace: namespace.to_owned() };
                }
                (404, _) => return Error::KindNotServed { kind },
                (403, _) => {
                    return Error::Forbidden {
                        verb,
                        target,
                        namespace: namespace.to_owned(),
                        message: status.message.clone(),
                    };
                }
                _ => {}
            }
        }
        Error::Api { verb, target, namespace: namespace.to_owned(), source: Box::new(source) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::core::response::StatusDetails;
    use kube::core::Status;

    fn status(code: u16, reason: &str, name: &str) -> kube::Error {
        let mut status = Status::failure(&format!("{reason} message"), reason).with_code(code);
        let details = serde_json::json!({"name": name});
        status.details = Some(serde_json::from_value::<StatusDetails>(details).expect("details"));
        kube::Error::Api(Box::new(status))
    }

    #[test]
    fn a_missing_object_is_named_with_its_namespace() {
        let error = Error::from_api(status(404, "NotFound", "eu"), "patch", "Region", Some("eu"), "chat");
        assert_eq!(error.to_string(), "Region eu not found in namespace chat");
    }

    #[test]
    fn a_missing_kind_says_the_crd_is_not_installed() {
        let error = Error::from_api(status(404, "NotFound", ""), "patch", "Region", Some("eu"), "chat");
        assert!(matches!(error, Error::KindNotServed { kind: "Region" }), "{error}");
        let error = Error::from_api(status(404, "NotFound", ""), "list", "ChatCluster", None, "chat");
        assert!(error.to_string().contains("ChatCluster"), "{error}");
        // What kube makes of a plain-text "404 page not found".
        let text = kube::Error::Api(Box::new(
            Status::failure("404 page not found", "Failed to parse error data").with_code(404),
        ));
        let error = Error::from_api(text, "get", "ChatCluster", Some("chat"), "chat");
        assert!(matches!(error, Error::KindNotServed { kind: "ChatCluster" }), "{error}");
    }

    #[test]
    fn forbidden_names_the_verb_and_the_object() {
        let error = Error::from_api(status(403, "Forbidden", "eu"), "patch", "Region", Some("eu"), "chat");
        assert_eq!(error.to_string(), "forbidden to patch Region eu in namespace chat: Forbidden message");
    }

    #[test]
    fn several_clusters_list_them() {
        let error = Error::SeveralChatClusters { namespace: "chat".into(), names: vec!["a".into(), "b".into()] };
        assert_eq!(
            error.to_string(),
            "2 ChatClusters in namespace chat (a, b): name one, as in `kubectl parley status a`"
        );
    }
}
