//! The part of kustomize our manifests use, resolved in Rust so that `xtask kind` and the tests
//! need no kustomize binary: `resources` (files and kustomization folders), `images` and
//! `patches` (strategic-merge patches from files). Anything else in a kustomization is refused
//! rather than silently ignored. The tests compare the result with `kubectl kustomize` where
//! kubectl is installed.

use std::path::Path;

use anyhow::{Context as _, bail};
use serde_yaml::Value;

/// The objects `dir`'s kustomization renders, in resource order.
pub fn render(dir: &Path) -> anyhow::Result<Vec<Value>> {
    let file = ["kustomization.yaml", "kustomization.yml", "Kustomization"]
        .iter()
        .map(|name| dir.join(name))
        .find(|path| path.exists())
        .with_context(|| format!("no kustomization.yaml in {}", dir.display()))?;
    let text =
        std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
    let kustomization: Value =
        serde_yaml::from_str(&text).with_context(|| format!("parsing {}", file.display()))?;
    let Value::Mapping(fields) = &kustomization else {
        bail!("{}: not a mapping", file.display());
    };
    for key in fields.keys() {
        let key = key.as_str().unwrap_or_default();
        if !matches!(
            key,
            "apiVersion" | "kind" | "resources" | "images" | "patches"
        ) {
            bail!(
                "{}: `{key}` is not supported by xtask's kustomize (resources, images, patches)",
                file.display()
            );
        }
    }

    let mut objects = Vec::new();
    for resource in strings(&kustomization["resources"], &file, "resources")? {
        let path = dir.join(&resource);
        if path.is_dir() {
            objects.extend(render(&path)?);
        } else {
            objects.extend(read_documents(&path)?);
        }
    }
    for patch in kustomization["patches"].as_sequence().into_iter().flatten() {
        let path = patch["path"]
            .as_str()
            .with_context(|| format!("{}: patches need a `path`", file.display()))?;
        if !patch["target"].is_null() || !patch["patch"].is_null() {
            bail!(
                "{}: only strategic-merge patches from `path` are supported",
                file.display()
            );
        }
        for doc in read_documents(&dir.join(path))? {
            let target = objects
                .iter_mut()
                .find(|object| same_object(object, &doc))
                .with_context(|| {
                    format!(
                        "{}: {path} patches an object that is not there",
                        file.display()
                    )
                })?;
            merge(target, &doc);
        }
    }
    for image in kustomization["images"].as_sequence().into_iter().flatten() {
        let name = image["name"]
            .as_str()
            .with_context(|| format!("{}: images need a `name`", file.display()))?;
        for object in &mut objects {
            set_image(
                object,
                name,
                image["newName"].as_str(),
                image["newTag"].as_str(),
            );
        }
    }
    Ok(objects)
}

/// Every non-empty YAML document of a file.
pub fn read_documents(path: &Path) -> anyhow::Result<Vec<Value>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let value = <Value as serde::Deserialize>::deserialize(doc)
            .with_context(|| format!("parsing {}", path.display()))?;
        if !value.is_null() {
            out.push(value);
        }
    }
    Ok(out)
}

/// Multi-document YAML of `objects`, for `kubectl apply -f`.
pub fn to_yaml(objects: &[Value]) -> anyhow::Result<String> {
    let mut out = String::new();
    for object in objects {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(object)?);
    }
    Ok(out)
}

/// `kind/namespace/name`, the identity kustomize matches patches by.
pub fn id(object: &Value) -> String {
    format!(
        "{}/{}/{}",
        object["kind"].as_str().unwrap_or_default(),
        object["metadata"]["namespace"].as_str().unwrap_or_default(),
        object["metadata"]["name"].as_str().unwrap_or_default()
    )
}

fn same_object(a: &Value, b: &Value) -> bool {
    id(a) == id(b)
}

fn strings(value: &Value, file: &Path, field: &str) -> anyhow::Result<Vec<String>> {
    value
        .as_sequence()
        .into_iter()
        .flatten()
        .map(|v| {
            v.as_str()
                .map(str::to_owned)
                .with_context(|| format!("{}: {field} must be strings", file.display()))
        })
        .collect()
}

/// Strategic merge as kustomize does it for the fields our patches touch: mappings merge, `null`
/// deletes, lists of named mappings (containers, env, volumes) merge by `name` (the patch's items
/// first, in its order, then the target's others, as `kubectl kustomize` orders them), other
/// lists are replaced.
pub fn merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Mapping(target), Value::Mapping(patch)) => {
            for (key, value) in patch {
                if value.is_null() {
                    target.remove(key);
                } else if let Some(existing) = target.get_mut(key) {
                    merge(existing, value);
                } else {
                    target.insert(key.clone(), value.clone());
                }
            }
        }
        (Value::Sequence(target), Value::Sequence(patch)) if named(target) && named(patch) => {
            let mut merged = Vec::with_capacity(target.len() + patch.len());
            for item in patch {
                match target.iter().position(|t| t["name"] == item["name"]) {
                    Some(at) => {
                        let mut existing = target.remove(at);
                        merge(&mut existing, item);
                        merged.push(existing);
                    }
                    None => merged.push(item.clone()),
                }
            }
            merged.append(target);
            *target = merged;
        }
        (target, patch) => *target = patch.clone(),
    }
}

fn named(items: &[Value]) -> bool {
    !items.is_empty() && items.iter().all(|i| i["name"].is_string())
}

/// kustomize's `images` transformer on a workload's (init) containers.
fn set_image(object: &mut Value, name: &str, new_name: Option<&str>, new_tag: Option<&str>) {
    // `get_mut`, not indexing: indexing a mapping inserts the keys it does not find.
    let is_pod = object["kind"] == "Pod";
    let Some(mut spec) = object.get_mut("spec") else {
        return;
    };
    if !is_pod {
        match spec.get_mut("template").and_then(|t| t.get_mut("spec")) {
            Some(inner) => spec = inner,
            None => return,
        }
    }
    let Value::Mapping(spec) = spec else { return };
    for list in ["containers", "initContainers"] {
        let Some(Value::Sequence(containers)) = spec.get_mut(list) else {
            continue;
        };
        for container in containers {
            let Some(image) = container["image"].as_str() else {
                continue;
            };
            let (repo, tag) = split_image(image);
            if repo != name {
                continue;
            }
            let repo = new_name.unwrap_or(repo);
            let image = match new_tag.or(tag) {
                Some(tag) => format!("{repo}:{tag}"),
                None => repo.to_owned(),
            };
            if let Value::Mapping(container) = container {
                container.insert("image".into(), image.into());
            }
        }
    }
}

/// `repo[:tag]`, where a colon before the last slash belongs to a registry port.
pub fn split_image(image: &str) -> (&str, Option<&str>) {
    match image.rfind(':') {
        Some(i) if !image[i..].contains('/') => (&image[..i], Some(&image[i + 1..])),
        _ => (image, None),
    }
}

/// The containers of a workload object (Deployment, DaemonSet, Job...), init containers first.
pub fn containers(object: &Value) -> Vec<&Value> {
    let spec = &object["spec"]["template"]["spec"];
    ["initContainers", "containers"]
        .iter()
        .flat_map(|list| spec[list].as_sequence().into_iter().flatten())
        .filter(|c| c.is_mapping())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_by_name_replaces_scalar_lists_and_deletes_nulls() {
        let mut target: Value = serde_yaml::from_str(
            "spec: {containers: [{name: a, args: [x, y], image: i}, {name: b}], keep: 1, drop: 2}",
        )
        .unwrap();
        let patch: Value = serde_yaml::from_str(
            "spec: {containers: [{name: a, args: [z]}, {name: c}], drop: null}",
        )
        .unwrap();
        merge(&mut target, &patch);
        let want: Value = serde_yaml::from_str(
            "spec: {containers: [{name: a, args: [z], image: i}, {name: c}, {name: b}], keep: 1}",
        )
        .unwrap();
        assert_eq!(target, want);
    }

    #[test]
    fn image_names_split_at_the_tag_not_the_registry_port() {
        assert_eq!(split_image("fulgur:0.1.0"), ("fulgur", Some("0.1.0")));
        assert_eq!(split_image("fulgur"), ("fulgur", None));
        assert_eq!(
            split_image("localhost:5000/fulgur"),
            ("localhost:5000/fulgur", None)
        );
        assert_eq!(
            split_image("localhost:5000/fulgur:1"),
            ("localhost:5000/fulgur", Some("1"))
        );
    }
}
