//! What the store and the evaluation say about an image's store paths, for its SBOM: each
//! path's NAR hash, references and deriver (`nix path-info --json`), each deriver's `pname`
//! and `version` (`nix derivation show`), and the licences the container's packages declare
//! (`meta.license.spdxId`, evaluated without any secret). Every query is one exec for all
//! paths; what nix prints is read by the pure functions below.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{bail, Result};
use serde::Deserialize;

use super::text::{error_excerpt, nix_cmd};
use super::{NixContainer, WORKSPACE};
use crate::engine::OutputMode;
use crate::exit::Unexpected;

/// One store path as the store knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PathInfo {
    pub(crate) path: String,
    /// As nix prints it: `sha256-BASE64` (SRI) or `sha256:NIX32`.
    pub(crate) nar_hash: String,
    pub(crate) nar_size: u64,
    /// Store paths it refers to, itself left out, sorted.
    pub(crate) references: Vec<String>,
    pub(crate) deriver: Option<String>,
}

/// The names a derivation gives itself.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct DrvNames {
    pub(crate) name: Option<String>,
    pub(crate) pname: Option<String>,
    pub(crate) version: Option<String>,
}

impl NixContainer {
    /// The closure of `paths` in the store, each path once, sorted by path.
    pub(crate) async fn path_infos(&self, paths: &[String]) -> Result<Vec<PathInfo>> {
        if paths.is_empty() {
            return Ok(Vec::new());
        }
        let mut cmd = nix_cmd(&["path-info", "--json", "--recursive"]);
        cmd.extend(paths.iter().cloned());
        let out = self.guard.exec(&cmd, &[], None, OutputMode::Captured).await?;
        if out.exit_code != 0 {
            bail!(
                "nix path-info failed (exit code {}); are the image's store paths still in the store?\n{}",
                out.exit_code,
                error_excerpt(&out.stderr_tail)
            );
        }
        parse_path_infos(&out.stdout)
            .map_err(|e| Unexpected(format!("nix path-info --json printed something unexpected: {e:#}")).into())
    }

    /// `pname`, `version` and `name` of each of `drvs` that is in the store; the others are
    /// left out (a substituted path's deriver need not be there).
    pub(crate) async fn derivation_names(&self, drvs: &[String]) -> Result<BTreeMap<String, DrvNames>> {
        if drvs.is_empty() {
            return Ok(BTreeMap::new());
        }
        let show = |drvs: Vec<String>| async move {
            let mut cmd = nix_cmd(&["derivation", "show"]);
            cmd.extend(drvs);
            self.guard.exec(&cmd, &[], None, OutputMode::Captured).await
        };
        let mut out = show(drvs.to_vec()).await?;
        if out.exit_code != 0 {
            // Some deriver is not in the store: ask again for those that are.
            let present = self.valid(drvs).await?;
            if present.is_empty() {
                return Ok(BTreeMap::new());
            }
            out = show(present).await?;
        }
        if out.exit_code != 0 {
            bail!("nix derivation show failed (exit code {}):\n{}", out.exit_code, error_excerpt(&out.stderr_tail));
        }
        parse_derivations(&out.stdout)
            .map_err(|e| Unexpected(format!("nix derivation show printed something unexpected: {e:#}")).into())
    }

    /// The SPDX licence identifiers `containers/NAME/default.nix` declares for the outputs of
    /// the derivations it is built from (`meta.license.spdxId`), by output path. Project code
    /// is evaluated here, so the exec gets no secret (`Phase::Evaluate`).
    pub(crate) async fn licences(&self, name: &str) -> Result<BTreeMap<String, Vec<String>>> {
        let expr = format!("({LICENCES_EXPR}) {{ name = {}; }}", nix_string(name));
        let cmd = nix_cmd(&["eval", "--impure", "--json", "--expr", &expr]);
        let out = self.guard.exec(&cmd, &self.eval_env(), Some(WORKSPACE), OutputMode::Captured).await?;
        if out.exit_code != 0 {
            bail!(
                "cannot evaluate the licences of containers/{name}/default.nix (exit code {}):\n{}",
                out.exit_code,
                error_excerpt(&out.stderr_tail)
            );
        }
        parse_licences(&out.stdout)
            .map_err(|e| Unexpected(format!("nix eval of the licences printed something unexpected: {e:#}")).into())
    }
}

/// Walks the derivations a container is built from (through each one's `drvAttrs`: derivations
/// and lists of them), and gives `[{path, licenses}]` for each output whose derivation declares
/// `meta.license` with an `spdxId` (one licence or a list). Whatever fails to evaluate is
/// passed over: the licence is then unknown, not an error.
const LICENCES_EXPR: &str = r#"{ name }:
let
  file = /workspace/containers + "/${name}/default.nix";
  f = import file;
  image = if builtins.isFunction f then f { } else f;
  ok = x: let r = builtins.tryEval x; in r.success && r.value;
  isDrv = x: ok (builtins.isAttrs x && (x.type or null) == "derivation");
  flat = xs: builtins.concatMap (x:
    let r = builtins.tryEval x; in
    if !r.success then [ ]
    else if isDrv r.value then [ r.value ]
    else if ok (builtins.isList r.value) then flat r.value
    else [ ]) xs;
  inputs = d:
    let a = builtins.tryEval (d.drvAttrs or { }); in
    if a.success then flat (builtins.attrValues a.value) else [ ];
  key = d: let r = builtins.tryEval (builtins.unsafeDiscardStringContext d.outPath); in if r.success then r.value else "";
  all = builtins.genericClosure {
    startSet = map (d: { key = key d; inherit d; }) (flat [ image ]);
    operator = item: map (d: { key = key d; inherit d; }) (inputs item.d);
  };
  spdx = l:
    if builtins.isList l then builtins.concatMap spdx l
    else if builtins.isAttrs l && l ? spdxId && builtins.isString l.spdxId then [ l.spdxId ]
    else [ ];
  licencesOf = d: let r = builtins.tryEval (builtins.deepSeq (spdx (d.meta.license or [ ])) (spdx (d.meta.license or [ ]))); in
    if r.success then r.value else [ ];
  outPaths = d: let r = builtins.tryEval (builtins.deepSeq (map (o: builtins.unsafeDiscardStringContext d.${o}.outPath) (d.outputs or [ "out" ])) (map (o: builtins.unsafeDiscardStringContext d.${o}.outPath) (d.outputs or [ "out" ]))); in
    if r.success then r.value else [ ];
in
builtins.concatMap (item:
  let l = licencesOf item.d; in
  if l == [ ] then [ ] else map (p: { path = p; licenses = l; }) (outPaths item.d)
) (builtins.filter (item: item.key != "") all)
"#;

/// `s` as a nix string literal: nothing in it is nix code.
fn nix_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' | '\\' | '$' => {
                out.push('\\');
                out.push(c);
            }
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawPathInfo {
    path: Option<String>,
    nar_hash: String,
    #[serde(default)]
    nar_size: u64,
    #[serde(default)]
    references: Vec<String>,
    deriver: Option<String>,
}

/// `nix path-info --json`: an object keyed by store path (nix 2.19 on; the keys may be plain
/// `HASH-NAME` in later formats), or a list of objects with `path` (before 2.19).
pub(crate) fn parse_path_infos(json: &str) -> Result<Vec<PathInfo>> {
    let value: serde_json::Value = serde_json::from_str(json.trim())?;
    let raw: Vec<(String, serde_json::Value)> = match value {
        serde_json::Value::Object(map) => map.into_iter().collect(),
        serde_json::Value::Array(items) => items
            .into_iter()
            .map(|item| {
                let path = item.get("path").and_then(|p| p.as_str()).unwrap_or_default().to_string();
                (path, item)
            })
            .collect(),
        _ => bail!("neither an object nor a list"),
    };
    let mut infos = BTreeMap::new();
    for (key, item) in raw {
        if item.is_null() {
            bail!("{key} is not valid in the store");
        }
        let info: RawPathInfo = serde_json::from_value(item)?;
        let path = store_path(info.path.as_deref().unwrap_or(&key));
        if !path.starts_with("/nix/store/") || path.len() <= "/nix/store/".len() {
            bail!("{path:?} is not a store path");
        }
        let references: BTreeSet<String> =
            info.references.iter().map(|r| store_path(r)).filter(|r| *r != path).collect();
        let deriver = info.deriver.filter(|d| !d.is_empty()).map(|d| store_path(&d));
        let info = PathInfo {
            path: path.clone(),
            nar_hash: info.nar_hash,
            nar_size: info.nar_size,
            references: references.into_iter().collect(),
            deriver,
        };
        infos.insert(path, info);
    }
    Ok(infos.into_values().collect())
}

/// `/nix/store/x` as is; a bare `x` (newer nix's JSON) under `/nix/store/`.
fn store_path(p: &str) -> String {
    if p.starts_with('/') {
        p.to_string()
    } else {
        format!("/nix/store/{p}")
    }
}

#[derive(Deserialize)]
struct RawDerivation {
    name: Option<String>,
    #[serde(default)]
    env: BTreeMap<String, serde_json::Value>,
}

/// `nix derivation show`: an object keyed by derivation path (bare names in later formats),
/// or, in nix 2.33's format, that object under `derivations`.
pub(crate) fn parse_derivations(json: &str) -> Result<BTreeMap<String, DrvNames>> {
    let mut value: serde_json::Value = serde_json::from_str(json.trim())?;
    if let Some(inner) = value.get_mut("derivations").filter(|v| v.is_object()) {
        value = inner.take();
    }
    let serde_json::Value::Object(map) = value else { bail!("not an object") };
    let mut names = BTreeMap::new();
    for (key, item) in map {
        let drv: RawDerivation = serde_json::from_value(item)?;
        let text = |k: &str| drv.env.get(k).and_then(|v| v.as_str()).filter(|s| !s.is_empty()).map(str::to_string);
        let entry = DrvNames {
            name: drv.name.clone().or_else(|| text("name")),
            pname: text("pname"),
            version: text("version"),
        };
        names.insert(store_path(&key), entry);
    }
    Ok(names)
}

#[derive(Deserialize)]
struct RawLicence {
    path: String,
    licenses: Vec<String>,
}

/// The licence walk's `[{path, licenses}]`, by path; identifiers sorted, without repeats.
pub(crate) fn parse_licences(json: &str) -> Result<BTreeMap<String, Vec<String>>> {
    let items: Vec<RawLicence> = serde_json::from_str(json.trim())?;
    let mut by_path: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for item in items {
        by_path.entry(item.path).or_default().extend(item.licenses.into_iter().filter(|l| !l.is_empty()));
    }
    Ok(by_path.into_iter().filter(|(_, l)| !l.is_empty()).map(|(p, l)| (p, l.into_iter().collect())).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const HELLO: &str = "/nix/store/0a1b2c3d4e5f6g7h8i9j0k1l2m3n4p5q-hello-2.12.1";
    const BUSYBOX: &str = "/nix/store/1a1b2c3d4e5f6g7h8i9j0k1l2m3n4p5q-busybox-1.35.0";

    #[test]
    fn path_info_of_nix_2_19_on_is_an_object() {
        let json = format!(
            r#"{{"{HELLO}":{{"ca":null,"deriver":"/nix/store/zz-hello-2.12.1.drv","narHash":"sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=","narSize":1234,"references":["{BUSYBOX}","{HELLO}"],"registrationTime":1,"signatures":[],"ultimate":true}},
               "{BUSYBOX}":{{"deriver":null,"narHash":"sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73","narSize":9,"references":[]}}}}"#
        );
        let infos = parse_path_infos(&json).unwrap();
        assert_eq!(infos.len(), 2);
        assert_eq!(infos[0].path, HELLO);
        assert_eq!(infos[0].references, vec![BUSYBOX.to_string()], "itself is left out");
        assert_eq!(infos[0].deriver.as_deref(), Some("/nix/store/zz-hello-2.12.1.drv"));
        assert_eq!(infos[0].nar_size, 1234);
        assert_eq!(infos[1].deriver, None);
    }

    #[test]
    fn path_info_before_nix_2_19_is_a_list_and_newer_keys_may_be_bare() {
        let json = format!(r#"[{{"path":"{HELLO}","narHash":"sha256:x","narSize":1,"references":[]}}]"#);
        assert_eq!(parse_path_infos(&json).unwrap()[0].path, HELLO);
        let bare = r#"{"0a1b-hello":{"narHash":"sha256-x","narSize":1,"references":["1a1b-busybox"],"deriver":"zz-hello.drv"}}"#;
        let info = &parse_path_infos(bare).unwrap()[0];
        assert_eq!(info.path, "/nix/store/0a1b-hello");
        assert_eq!(info.references, vec!["/nix/store/1a1b-busybox".to_string()]);
        assert_eq!(info.deriver.as_deref(), Some("/nix/store/zz-hello.drv"));
    }

    #[test]
    fn an_invalid_path_or_garbage_is_an_error() {
        assert!(parse_path_infos(&format!(r#"{{"{HELLO}":null}}"#)).unwrap_err().to_string().contains("not valid"));
        assert!(parse_path_infos("not json").is_err());
        assert!(parse_path_infos(r#"{"/tmp/x":{"narHash":"h","references":[]}}"#).is_err());
    }

    #[test]
    fn derivations_give_pname_and_version_when_they_have_them() {
        let json = r#"{"/nix/store/a-hello-2.12.1.drv":{"name":"hello-2.12.1","env":{"name":"hello-2.12.1","pname":"hello","version":"2.12.1","out":"/nix/store/x"}},
                       "b-novers.drv":{"env":{"name":"novers","version":""}}}"#;
        let names = parse_derivations(json).unwrap();
        let hello = &names["/nix/store/a-hello-2.12.1.drv"];
        assert_eq!((hello.pname.as_deref(), hello.version.as_deref()), (Some("hello"), Some("2.12.1")));
        let novers = &names["/nix/store/b-novers.drv"];
        assert_eq!(novers, &DrvNames { name: Some("novers".to_string()), pname: None, version: None });
        let wrapped = r#"{"derivations":{"c-x-1.drv":{"name":"x-1","env":{"pname":"x","version":"1"}}},"version":4}"#;
        assert_eq!(parse_derivations(wrapped).unwrap()["/nix/store/c-x-1.drv"].pname.as_deref(), Some("x"));
    }

    #[test]
    fn names_become_nix_strings_not_code() {
        assert_eq!(nix_string("hello"), r#""hello""#);
        assert_eq!(nix_string(r#"a"b\c${x}"#), r#""a\"b\\c\${x}""#);
        assert_eq!(nix_string("a\nb"), r#""a\nb""#);
    }

    #[test]
    fn licences_are_merged_by_path() {
        let json = r#"[{"path":"/nix/store/a","licenses":["MIT"]},{"path":"/nix/store/a","licenses":["Apache-2.0","MIT"]},{"path":"/nix/store/b","licenses":[""]}]"#;
        let licences = parse_licences(json).unwrap();
        assert_eq!(licences["/nix/store/a"], vec!["Apache-2.0".to_string(), "MIT".to_string()]);
        assert!(!licences.contains_key("/nix/store/b"));
        assert!(parse_licences("{}").is_err());
    }
}
