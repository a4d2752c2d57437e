//! Pod volumes as directories of the runner's state dir, and the bind mounts that put them at their `mountPath`s
//! inside a container's own mount namespace.
//!
//! Supported: `emptyDir` (an empty directory; `medium: Memory` is a directory too), `secret` and `configMap` (one
//! file per key, or per `items` entry at its `path`, with `defaultMode`/`mode`; a missing object or key fails the
//! pod unless `optional`), `downwardAPI` (`fieldRef` items), and `projected` volumes of those plus
//! `serviceAccountToken` (a TokenRequest bound to the pod, as the `kube-api-access-*` volume the ServiceAccount
//! admission plugin adds). The files are written once when the pod starts: later changes of the Secret or
//! ConfigMap do not reach a running pod, and tokens are not rotated. Any other volume type fails the pod with a
//! message naming it.
//!
//! A `volumeMount` becomes a bind mount of `<volume dir>[/<subPath>]` at `mountPath`, read-only when `readOnly`.
//! Mounts are made parents first. The mount point must exist on the host: a missing directory (or, for a file
//! `subPath`, an empty file) is created on the host, outside the mount namespace, and left there.

use super::env::{self, Addresses, Sources};
use k8s_openapi::api::core::v1::{Container, DownwardAPIVolumeFile, KeyToPath, Pod, Volume};
use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

/// One bind mount of a container.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Mount {
    /// What is mounted (a directory or a file of the runner's state dir).
    pub source: PathBuf,
    /// Where, inside the container's mount namespace.
    pub target: PathBuf,
    /// Mounted read-only.
    pub read_only: bool,
}

fn pod_volumes(pod: &Pod) -> impl Iterator<Item = &Volume> {
    pod.spec.iter().flat_map(|spec| spec.volumes.iter().flatten())
}

/// Names of the ConfigMaps and Secrets the pod's volumes use.
pub fn references(pod: &Pod) -> (Vec<String>, Vec<String>) {
    let (mut config_maps, mut secrets) = (Vec::new(), Vec::new());
    for volume in pod_volumes(pod) {
        if let Some(source) = &volume.config_map {
            config_maps.push(source.name.clone());
        }
        if let Some(source) = volume.secret.as_ref().and_then(|source| source.secret_name.clone()) {
            secrets.push(source);
        }
        for projection in volume.projected.iter().flat_map(|projected| projected.sources.iter().flatten()) {
            if let Some(source) = &projection.config_map {
                config_maps.push(source.name.clone());
            }
            if let Some(source) = &projection.secret {
                secrets.push(source.name.clone());
            }
        }
    }
    config_maps.sort();
    config_maps.dedup();
    secrets.sort();
    secrets.dedup();
    (config_maps, secrets)
}

/// A ServiceAccount token a projected volume wants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenWanted {
    /// `<volume>/<path>`, the key of [`Sources::tokens`].
    pub key: String,
    /// Its audience (`None`: the API server's).
    pub audience: Option<String>,
    /// Its lifetime.
    pub expiration_seconds: Option<i64>,
}

/// The ServiceAccount tokens of the pod's projected volumes.
pub fn token_requests(pod: &Pod) -> Vec<TokenWanted> {
    let mut out = Vec::new();
    for volume in pod_volumes(pod) {
        for projection in volume.projected.iter().flat_map(|projected| projected.sources.iter().flatten()) {
            if let Some(token) = &projection.service_account_token {
                out.push(TokenWanted {
                    key: format!("{}/{}", volume.name, token.path),
                    audience: token.audience.clone().filter(|audience| !audience.is_empty()),
                    expiration_seconds: token.expiration_seconds,
                });
            }
        }
    }
    out
}

fn downward_files(
    dir: &Path,
    pod: &Pod,
    items: &[DownwardAPIVolumeFile],
    default_mode: i32,
    addresses: Addresses,
) -> Result<(), String> {
    for item in items {
        let Some(field) = &item.field_ref else {
            return Err(format!("downwardAPI item {}: only fieldRef is supported by the pod runner", item.path));
        };
        let value = env::field(pod, &field.field_path, addresses)?;
        write_file(dir, &item.path, value.as_bytes(), item.mode.unwrap_or(default_mode))?;
    }
    Ok(())
}

fn relative(path: &str) -> Result<PathBuf, String> {
    let path = Path::new(path);
    if path.as_os_str().is_empty() || !path.components().all(|component| matches!(component, Component::Normal(_))) {
        return Err(format!("path {path:?} must be relative, without '..'"));
    }
    Ok(path.to_path_buf())
}

fn write_file(dir: &Path, path: &str, bytes: &[u8], mode: i32) -> Result<(), String> {
    let file = dir.join(relative(path)?);
    if let Some(parent) = file.parent() {
        std::fs::create_dir_all(parent).map_err(|error| format!("cannot create {}: {error}", parent.display()))?;
    }
    std::fs::write(&file, bytes).map_err(|error| format!("cannot write {}: {error}", file.display()))?;
    let mode = u32::try_from(mode).unwrap_or(0o644) & 0o777;
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode))
        .map_err(|error| format!("cannot set the mode of {}: {error}", file.display()))
}

/// Writes the `data` of a Secret or ConfigMap (`entries`) into `dir`, all keys or only `items`.
fn write_entries(
    dir: &Path,
    what: &str,
    entries: &BTreeMap<String, Vec<u8>>,
    items: Option<&[KeyToPath]>,
    default_mode: i32,
    optional: bool,
) -> Result<(), String> {
    match items {
        None => {
            for (key, bytes) in entries {
                write_file(dir, key, bytes, default_mode)?;
            }
        }
        Some(items) => {
            for item in items {
                match entries.get(&item.key) {
                    Some(bytes) => write_file(dir, &item.path, bytes, item.mode.unwrap_or(default_mode))?,
                    None if optional => {}
                    None => return Err(format!("{what} has no key {:?}", item.key)),
                }
            }
        }
    }
    Ok(())
}

fn config_map_entries(config_map: k8s_openapi::api::core::v1::ConfigMap) -> BTreeMap<String, Vec<u8>> {
    let mut entries: BTreeMap<String, Vec<u8>> =
        config_map.data.unwrap_or_default().into_iter().map(|(key, value)| (key, value.into_bytes())).collect();
    entries.extend(config_map.binary_data.unwrap_or_default().into_iter().map(|(key, value)| (key, value.0)));
    entries
}

/// The kubelet's default file mode of Secret and ConfigMap volumes (0644).
const DEFAULT_MODE: i32 = 0o644;

/// Writes one volume into `dir` (which exists and is empty).
fn materialize(volume: &Volume, dir: &Path, pod: &Pod, sources: &Sources, addresses: Addresses) -> Result<(), String> {
    if let Some(downward) = &volume.downward_api {
        let mode = downward.default_mode.unwrap_or(DEFAULT_MODE);
        return downward_files(dir, pod, downward.items.as_deref().unwrap_or_default(), mode, addresses);
    }
    if let Some(projected) = &volume.projected {
        let mode = projected.default_mode.unwrap_or(DEFAULT_MODE);
        for projection in projected.sources.iter().flatten() {
            if let Some(source) = &projection.config_map {
                let optional = source.optional == Some(true);
                match sources.config_maps.get(&source.name).cloned().flatten() {
                    Some(config_map) => {
                        let entries = config_map_entries(config_map);
                        write_entries(
                            dir,
                            &format!("configmap {:?}", source.name),
                            &entries,
                            source.items.as_deref(),
                            mode,
                            optional,
                        )?;
                    }
                    None if optional => {}
                    None => return Err(format!("configmap {:?} not found (volume {})", source.name, volume.name)),
                }
            } else if let Some(source) = &projection.secret {
                let optional = source.optional == Some(true);
                match sources.secrets.get(&source.name).cloned().flatten() {
                    Some(secret) => {
                        let entries =
                            secret.data.unwrap_or_default().into_iter().map(|(key, value)| (key, value.0)).collect();
                        write_entries(
                            dir,
                            &format!("secret {:?}", source.name),
                            &entries,
                            source.items.as_deref(),
                            mode,
                            optional,
                        )?;
                    }
                    None if optional => {}
                    None => return Err(format!("secret {:?} not found (volume {})", source.name, volume.name)),
                }
            } else if let Some(downward) = &projection.downward_api {
                downward_files(dir, pod, downward.items.as_deref().unwrap_or_default(), mode, addresses)?;
            } else if let Some(token) = &projection.service_account_token {
                let key = format!("{}/{}", volume.name, token.path);
                let value = sources.tokens.get(&key).ok_or_else(|| format!("no ServiceAccount token for {key}"))?;
                write_file(dir, &token.path, value.as_bytes(), mode)?;
            } else {
                return Err(format!(
                    "volume {}: a projected source the pod runner does not support (only configMap, secret, \
                     downwardAPI and serviceAccountToken)",
                    volume.name
                ));
            }
        }
        return Ok(());
    }
    if volume.empty_dir.is_some() {
        return std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777))
            .map_err(|error| format!("cannot set the mode of {}: {error}", dir.display()));
    }
    if let Some(source) = &volume.secret {
        let name = source.secret_name.clone().unwrap_or_default();
        let optional = source.optional == Some(true);
        return match sources.secrets.get(&name).cloned().flatten() {
            Some(secret) => {
                let entries: BTreeMap<String, Vec<u8>> =
                    secret.data.unwrap_or_default().into_iter().map(|(key, value)| (key, value.0)).collect();
                write_entries(
                    dir,
                    &format!("secret {name:?}"),
                    &entries,
                    source.items.as_deref(),
                    source.default_mode.unwrap_or(DEFAULT_MODE),
                    optional,
                )
            }
            None if optional => Ok(()),
            None => Err(format!("secret {name:?} not found (volume {})", volume.name)),
        };
    }
    if let Some(source) = &volume.config_map {
        let optional = source.optional == Some(true);
        return match sources.config_maps.get(&source.name).cloned().flatten() {
            Some(config_map) => {
                let entries = config_map_entries(config_map);
                write_entries(
                    dir,
                    &format!("configmap {:?}", source.name),
                    &entries,
                    source.items.as_deref(),
                    source.default_mode.unwrap_or(DEFAULT_MODE),
                    optional,
                )
            }
            None if optional => Ok(()),
            None => Err(format!("configmap {:?} not found (volume {})", source.name, volume.name)),
        };
    }
    Err(format!(
        "volume {} is of a type the pod runner does not support (only emptyDir, secret, configMap, downwardAPI and \
         projected)",
        volume.name
    ))
}

/// Writes every volume of the pod under `volumes_dir/<name>` (replacing what was there).
pub fn materialize_all(pod: &Pod, volumes_dir: &Path, sources: &Sources, addresses: Addresses) -> Result<(), String> {
    if volumes_dir.exists() {
        std::fs::remove_dir_all(volumes_dir)
            .map_err(|error| format!("cannot clear {}: {error}", volumes_dir.display()))?;
    }
    for volume in pod.spec.iter().flat_map(|spec| spec.volumes.iter().flatten()) {
        let dir = volumes_dir.join(relative(&volume.name)?);
        std::fs::create_dir_all(&dir).map_err(|error| format!("cannot create {}: {error}", dir.display()))?;
        materialize(volume, &dir, pod, sources, addresses)?;
    }
    Ok(())
}

/// The bind mounts of a container, parents first.
pub fn mounts(container: &Container, volumes_dir: &Path) -> Result<Vec<Mount>, String> {
    let mut out = Vec::new();
    for mount in container.volume_mounts.iter().flatten() {
        let mut source = volumes_dir.join(relative(&mount.name)?);
        if let Some(sub_path) = mount.sub_path.as_deref().filter(|sub_path| !sub_path.is_empty()) {
            source = source.join(relative(sub_path)?);
        }
        if mount.sub_path_expr.as_deref().is_some_and(|expr| !expr.is_empty()) {
            return Err(format!("volumeMount {}: subPathExpr is not supported by the pod runner", mount.name));
        }
        let target = PathBuf::from(&mount.mount_path);
        if !target.is_absolute() {
            return Err(format!("volumeMount {}: mountPath {:?} must be absolute", mount.name, mount.mount_path));
        }
        out.push(Mount { source, target, read_only: mount.read_only == Some(true) });
    }
    out.sort_by_key(|mount| mount.target.components().count());
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Secret;
    use k8s_openapi::ByteString;
    use serde_json::json;

    fn pod(volumes: serde_json::Value) -> Pod {
        serde_json::from_value(
            json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c"}], "volumes": volumes}}),
        )
        .expect("pod")
    }

    fn sources() -> Sources {
        let secret = Secret {
            data: Some(BTreeMap::from([
                ("hs256".to_owned(), ByteString(b"key".to_vec())),
                ("other".to_owned(), ByteString(b"x".to_vec())),
            ])),
            ..Secret::default()
        };
        let config_map =
            serde_json::from_value(json!({"metadata": {"name": "cm"}, "data": {"a.conf": "A"}})).expect("cm");
        Sources {
            config_maps: BTreeMap::from([("cm".to_owned(), Some(config_map))]),
            secrets: BTreeMap::from([("jwt".to_owned(), Some(secret)), ("gone".to_owned(), None)]),
            tokens: BTreeMap::from([("api/token".to_owned(), "t0ken".to_owned())]),
        }
    }

    fn addresses() -> Addresses {
        Addresses { pod: std::net::Ipv4Addr::new(127, 1, 0, 1), host: std::net::Ipv4Addr::LOCALHOST }
    }

    #[test]
    fn secret_config_map_and_empty_dir_volumes_are_written() {
        let dir = std::env::temp_dir().join(parley_test_support::unique("runner-volumes-"));
        let pod = pod(json!([
            {"name": "tmp", "emptyDir": {}},
            {"name": "jwt", "secret": {"secretName": "jwt", "defaultMode": 0o440}},
            {"name": "one", "secret": {"secretName": "jwt", "items": [{"key": "hs256", "path": "sub/key.pem", "mode": 0o400}]}},
            {"name": "cm", "configMap": {"name": "cm"}},
            {"name": "maybe", "secret": {"secretName": "gone", "optional": true}}
        ]));
        materialize_all(&pod, &dir, &sources(), addresses()).expect("materialize");
        assert_eq!(std::fs::read(dir.join("jwt/hs256")).expect("file"), b"key");
        assert_eq!(std::fs::read(dir.join("jwt/other")).expect("file"), b"x");
        let mode = |path: &str| std::fs::metadata(dir.join(path)).expect("metadata").permissions().mode() & 0o777;
        assert_eq!(mode("jwt/hs256"), 0o440);
        assert_eq!(std::fs::read(dir.join("one/sub/key.pem")).expect("file"), b"key");
        assert_eq!(mode("one/sub/key.pem"), 0o400);
        assert!(!dir.join("one/other").exists());
        assert_eq!(std::fs::read(dir.join("cm/a.conf")).expect("file"), b"A");
        assert_eq!(mode("tmp"), 0o777);
        assert!(dir.join("maybe").is_dir());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn projected_and_downward_api_volumes_are_written() {
        let dir = std::env::temp_dir().join(parley_test_support::unique("runner-volumes-"));
        let pod = pod(json!([
            {"name": "api", "projected": {"sources": [
                {"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}},
                {"configMap": {"name": "cm", "items": [{"key": "a.conf", "path": "ca.crt"}]}},
                {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"fieldPath": "metadata.name"}}]}}
            ]}},
            {"name": "info", "downwardAPI": {"items": [{"path": "ip", "fieldRef": {"fieldPath": "status.podIP"}}]}}
        ]));
        assert_eq!(
            token_requests(&pod),
            vec![TokenWanted { key: "api/token".into(), audience: None, expiration_seconds: Some(3607) }]
        );
        assert_eq!(references(&pod), (vec!["cm".to_owned()], vec![]));
        materialize_all(&pod, &dir, &sources(), addresses()).expect("materialize");
        assert_eq!(std::fs::read(dir.join("api/token")).expect("token"), b"t0ken");
        assert_eq!(std::fs::read(dir.join("api/ca.crt")).expect("ca"), b"A");
        assert_eq!(std::fs::read(dir.join("api/namespace")).expect("name"), b"p");
        assert_eq!(std::fs::read(dir.join("info/ip")).expect("ip"), b"127.1.0.1");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn missing_sources_and_unsupported_volumes_fail_the_pod() {
        let dir = std::env::temp_dir().join(parley_test_support::unique("runner-volumes-"));
        for (volumes, wanted) in [
            (json!([{"name": "v", "secret": {"secretName": "gone"}}]), "secret \"gone\" not found"),
            (
                json!([{"name": "v", "secret": {"secretName": "jwt", "items": [{"key": "nope", "path": "x"}]}}]),
                "no key",
            ),
            (json!([{"name": "v", "hostPath": {"path": "/x"}}]), "does not support"),
            (
                json!([{"name": "v", "secret": {"secretName": "jwt", "items": [{"key": "hs256", "path": "../x"}]}}]),
                "'..'",
            ),
        ] {
            let error = materialize_all(&pod(volumes), &dir, &sources(), addresses()).expect_err("must fail");
            assert!(error.contains(wanted), "{error} lacks {wanted}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn mounts_come_parents_first_with_sub_paths() {
        let container: Container = serde_json::from_value(json!({
            "name": "c",
            "volumeMounts": [
                {"name": "jwt", "mountPath": "/etc/parley/jwt", "readOnly": true},
                {"name": "tmp", "mountPath": "/tmp"},
                {"name": "cm", "mountPath": "/etc/app.conf", "subPath": "a.conf"}
            ]
        }))
        .expect("container");
        let mounts = mounts(&container, Path::new("/v")).expect("mounts");
        let targets: Vec<&Path> = mounts.iter().map(|mount| mount.target.as_path()).collect();
        assert_eq!(targets, [Path::new("/tmp"), Path::new("/etc/app.conf"), Path::new("/etc/parley/jwt")]);
        assert_eq!(mounts[1].source, Path::new("/v/cm/a.conf"));
        assert!(mounts[2].read_only && !mounts[0].read_only);
    }
}
