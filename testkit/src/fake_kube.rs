//! An in-process fake Kubernetes API server, enough for the real kube client to run the
//! controller's Kubernetes provider against it over HTTP:
//! - discovery (`GET /apis/GROUP/VERSION`) of the resources a test serves;
//! - list, and watch from a resourceVersion (chunked JSON lines), with label selectors;
//! - get, create, replace (with resourceVersion conflicts), delete;
//! - patch: server-side apply (`application/apply-patch+yaml`) and JSON merge patch, on objects
//!   and on the `status` subresource.
//!
//! Every request is recorded so tests can check what the client did. Simplifications: server-side
//! apply replaces the top-level fields it names (no managed-fields bookkeeping), there is no
//! pagination, admission or validation, and watches never time out.

use std::{
    collections::{BTreeMap, VecDeque},
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use axum::{
    Router,
    body::{Body, Bytes},
    extract::{Request, State},
    http::{HeaderMap, Method, StatusCode, header},
    response::Response,
};
use serde_json::{Value, json};
use tokio::sync::broadcast;

/// One request as the server saw it.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub query: BTreeMap<String, String>,
    pub content_type: String,
    pub body: Value,
}

/// A served resource.
#[derive(Clone, Debug)]
struct Served {
    /// `v1`, or `group/version`.
    api_version: String,
    plural: String,
    kind: String,
    namespaced: bool,
}

impl Served {
    /// The URL prefix: `api/v1` or `apis/group/version`.
    fn prefix(&self) -> String {
        if self.api_version.contains('/') {
            format!("apis/{}", self.api_version)
        } else {
            format!("api/{}", self.api_version)
        }
    }
}

#[derive(Clone, Debug)]
struct Change {
    revision: u64,
    /// Index into `served`.
    resource: usize,
    namespace: String,
    type_: &'static str,
    object: Value,
}

#[derive(Default)]
struct Inner {
    revision: u64,
    served: Vec<Served>,
    /// (resource index, namespace, name) → object
    objects: BTreeMap<(usize, String, String), Value>,
    history: Vec<Change>,
    requests: Vec<Recorded>,
    /// Requests to fail with 500: (method, path suffix, how many more).
    failures: Vec<(String, String, usize)>,
}

struct Shared {
    inner: Mutex<Inner>,
    changes: broadcast::Sender<Change>,
}

/// The fake API server; it stops when dropped.
pub struct FakeKube {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeKube {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The resources every test needs: namespaces, services, endpoint slices, pods, leases, events.
const CORE: [(&str, &str, &str, bool); 6] = [
    ("v1", "namespaces", "Namespace", false),
    ("v1", "services", "Service", true),
    ("v1", "pods", "Pod", true),
    (
        "discovery.k8s.io/v1",
        "endpointslices",
        "EndpointSlice",
        true,
    ),
    ("coordination.k8s.io/v1", "leases", "Lease", true),
    ("events.k8s.io/v1", "events", "Event", true),
];

fn status_error(code: StatusCode, reason: &str, message: String) -> Response {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code.as_u16(),
    });
    respond(code, &body)
}

fn respond(code: StatusCode, body: &Value) -> Response {
    Response::builder()
        .status(code)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .expect("a valid response")
}

/// `a=b,c` (equality and existence) as kubectl writes it.
fn selector_matches(selector: &str, object: &Value) -> bool {
    let labels = &object["metadata"]["labels"];
    selector
        .split(',')
        .filter(|s| !s.is_empty())
        .all(|term| match term.split_once('=') {
            Some((k, v)) => labels[k.trim()].as_str() == Some(v.trim_start_matches('=').trim()),
            None => !labels[term.trim()].is_null(),
        })
}

/// RFC 7386.
fn merge_patch(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(target), Value::Object(patch)) => {
            for (k, v) in patch {
                if v.is_null() {
                    target.remove(k);
                } else {
                    merge_patch(target.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (target, patch) => *target = patch.clone(),
    }
}

impl Inner {
    fn find(&self, prefix: &str, plural: &str) -> Option<usize> {
        self.served
            .iter()
            .position(|s| s.prefix() == prefix && s.plural == plural)
    }

    fn by_kind(&self, api_version: &str, kind: &str) -> usize {
        self.served
            .iter()
            .position(|s| s.api_version == api_version && s.kind == kind)
            .unwrap_or_else(|| panic!("{api_version} {kind} is not served"))
    }

    /// Stores `object` (new revision, uid, generation) and announces the change.
    fn commit(
        &mut self,
        shared: &broadcast::Sender<Change>,
        resource: usize,
        namespace: &str,
        mut object: Value,
        type_: &'static str,
    ) -> Value {
        self.revision += 1;
        let key = (
            resource,
            namespace.to_owned(),
            object["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        );
        let previous = self.objects.get(&key).cloned();
        let served = &self.served[resource];
        object["apiVersion"] = served.api_version.clone().into();
        object["kind"] = served.kind.clone().into();
        let metadata = &mut object["metadata"];
        metadata["resourceVersion"] = self.revision.to_string().into();
        if served.namespaced {
            metadata["namespace"] = namespace.into();
        }
        match &previous {
            Some(previous) => {
                metadata["uid"] = previous["metadata"]["uid"].clone();
                metadata["creationTimestamp"] = previous["metadata"]["creationTimestamp"].clone();
                let generation = previous["metadata"]["generation"].as_i64().unwrap_or(1);
                let spec_changed = previous["spec"] != object["spec"];
                object["metadata"]["generation"] = (generation + i64::from(spec_changed)).into();
            }
            None => {
                metadata["uid"] = format!("uid-{}", self.revision).into();
                if metadata["creationTimestamp"].is_null() {
                    metadata["creationTimestamp"] =
                        humantime::format_rfc3339_seconds(std::time::SystemTime::now())
                            .to_string()
                            .into();
                }
                metadata["generation"] = 1.into();
            }
        }
        if type_ == "DELETED" {
            self.objects.remove(&key);
        } else {
            self.objects.insert(key, object.clone());
        }
        let change = Change {
            revision: self.revision,
            resource,
            namespace: namespace.to_owned(),
            type_,
            object: object.clone(),
        };
        self.history.push(change.clone());
        let _ = shared.send(change);
        object
    }
}

/// What a URL path names.
struct Target {
    resource: usize,
    namespace: Option<String>,
    name: Option<String>,
    status: bool,
}

impl FakeKube {
    /// Starts the server with the core resources; Gateway API resources come with [`serve`].
    pub async fn start() -> FakeKube {
        let (changes, _) = broadcast::channel(4096);
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner::default()),
            changes,
        });
        let fake_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = fake_listener.local_addr().unwrap();
        let app = Router::new().fallback(handle).with_state(shared.clone());
        let task = tokio::spawn(async move {
            axum::serve(fake_listener, app).await.unwrap();
        });
        let fake = FakeKube { addr, shared, task };
        for (api_version, plural, kind, namespaced) in CORE {
            fake.serve(api_version, plural, kind, namespaced);
        }
        fake
    }

    /// Serves a resource (discovery lists it; list, watch and the rest work on it).
    pub fn serve(&self, api_version: &str, plural: &str, kind: &str, namespaced: bool) {
        self.inner().served.push(Served {
            api_version: api_version.into(),
            plural: plural.into(),
            kind: kind.into(),
            namespaced,
        });
    }

    /// Serves the Gateway API: GatewayClass and Gateway `v1`, the routes at `route_version`
    /// (`v1`, or `v1alpha2` before Gateway API 1.5) and ReferenceGrant at `grant_version` (`v1`,
    /// or `v1beta1` before 1.5).
    pub fn serve_gateway_api(&self, route_version: &str, grant_version: &str) {
        let g = |v: &str| format!("gateway.networking.k8s.io/{v}");
        self.serve(&g("v1"), "gatewayclasses", "GatewayClass", false);
        self.serve(&g("v1"), "gateways", "Gateway", true);
        self.serve(&g(grant_version), "referencegrants", "ReferenceGrant", true);
        self.serve(&g(route_version), "tcproutes", "TCPRoute", true);
        self.serve(&g(route_version), "udproutes", "UDPRoute", true);
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.shared.inner.lock().unwrap()
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kube client for this server.
    pub fn client(&self) -> kube::Client {
        let config = kube::Config::new(self.url().parse().unwrap());
        kube::Client::try_from(config).unwrap()
    }

    /// Creates or replaces an object, as `kubectl apply` would (status kept when not given).
    pub fn apply(&self, mut object: Value) -> Value {
        let mut inner = self.inner();
        let api_version = object["apiVersion"].as_str().unwrap().to_owned();
        let resource = inner.by_kind(&api_version, object["kind"].as_str().unwrap());
        let namespace = if inner.served[resource].namespaced {
            object["metadata"]["namespace"]
                .as_str()
                .unwrap_or("default")
                .to_owned()
        } else {
            String::new()
        };
        let name = object["metadata"]["name"].as_str().unwrap().to_owned();
        let existing = inner
            .objects
            .get(&(resource, namespace.clone(), name))
            .cloned();
        let type_ = if existing.is_some() {
            "MODIFIED"
        } else {
            "ADDED"
        };
        if let Some(existing) = existing
            && object["status"].is_null()
            && !existing["status"].is_null()
        {
            object["status"] = existing["status"].clone();
        }
        inner.commit(&self.shared.changes, resource, &namespace, object, type_)
    }

    pub fn apply_yaml(&self, yaml: &str) {
        for document in serde_yaml::Deserializer::from_str(yaml) {
            let value: Value = serde::Deserialize::deserialize(document).unwrap();
            if !value.is_null() {
                self.apply(value);
            }
        }
    }

    pub fn delete(&self, api_version: &str, kind: &str, namespace: &str, name: &str) {
        let mut inner = self.inner();
        let resource = inner.by_kind(api_version, kind);
        let object = inner
            .objects
            .get(&(resource, namespace.to_owned(), name.to_owned()))
            .cloned()
            .unwrap_or_else(|| panic!("no {kind} {namespace}/{name}"));
        inner.commit(&self.shared.changes, resource, namespace, object, "DELETED");
    }

    pub fn get(&self, api_version: &str, kind: &str, namespace: &str, name: &str) -> Option<Value> {
        let inner = self.inner();
        let resource = inner.by_kind(api_version, kind);
        inner
            .objects
            .get(&(resource, namespace.to_owned(), name.to_owned()))
            .cloned()
    }

    /// Every object of a kind.
    pub fn list(&self, api_version: &str, kind: &str) -> Vec<Value> {
        let inner = self.inner();
        let resource = inner.by_kind(api_version, kind);
        inner
            .objects
            .iter()
            .filter(|((r, _, _), _)| *r == resource)
            .map(|(_, o)| o.clone())
            .collect()
    }

    /// The next `count` requests with this method and path suffix fail with 500.
    pub fn fail_next(&self, method: &str, path_suffix: &str, count: usize) {
        self.inner()
            .failures
            .push((method.into(), path_suffix.into(), count));
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.inner().requests.clone()
    }
}

fn target(inner: &Inner, path: &str) -> Option<Target> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (prefix, rest) = match segments.as_slice() {
        ["api", version, rest @ ..] => (format!("api/{version}"), rest),
        ["apis", group, version, rest @ ..] => (format!("apis/{group}/{version}"), rest),
        _ => return None,
    };
    let (namespace, rest) = match rest {
        ["namespaces", namespace, plural, rest @ ..] => (Some(namespace.to_string()), {
            let mut v = vec![*plural];
            v.extend_from_slice(rest);
            v
        }),
        rest => (None, rest.to_vec()),
    };
    let (plural, name, status) = match rest.as_slice() {
        [plural] => (*plural, None, false),
        [plural, name] => (*plural, Some(name.to_string()), false),
        [plural, name, "status"] => (*plural, Some(name.to_string()), true),
        _ => return None,
    };
    Some(Target {
        resource: inner.find(&prefix, plural)?,
        namespace,
        name,
        status,
    })
}

fn discovery(inner: &Inner, path: &str) -> Option<Value> {
    let prefix = path.trim_matches('/');
    let resources: Vec<Value> = inner
        .served
        .iter()
        .filter(|s| s.prefix() == prefix)
        .flat_map(|s| {
            let main = json!({
                "name": s.plural, "singularName": s.kind.to_lowercase(), "namespaced": s.namespaced,
                "kind": s.kind, "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"],
            });
            let status = json!({
                "name": format!("{}/status", s.plural), "singularName": "", "namespaced": s.namespaced,
                "kind": s.kind, "verbs": ["get", "patch", "update"],
            });
            [main, status]
        })
        .collect();
    if resources.is_empty() {
        return None;
    }
    let group_version = prefix
        .trim_start_matches("apis/")
        .trim_start_matches("api/");
    Some(json!({
        "kind": "APIResourceList", "apiVersion": "v1",
        "groupVersion": group_version, "resources": resources,
    }))
}

async fn handle(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let query: BTreeMap<String, String> =
        form_urlencoded::parse(request.uri().query().unwrap_or_default().as_bytes())
            .into_owned()
            .collect();
    let headers: HeaderMap = request.headers().clone();
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let bytes: Bytes = axum::body::to_bytes(request.into_body(), 16 << 20)
        .await
        .unwrap_or_default();
    let body: Value = if bytes.is_empty() {
        Value::Null
    } else {
        // Server-side apply bodies are YAML (JSON is YAML too).
        serde_yaml::from_slice(&bytes).unwrap_or(Value::Null)
    };
    let mut inner = shared.inner.lock().unwrap();
    inner.requests.push(Recorded {
        method: method.to_string(),
        path: path.clone(),
        query: query.clone(),
        content_type: content_type.clone(),
        body: body.clone(),
    });
    if let Some(failure) = inner.failures.iter_mut().find(|(m, suffix, left)| {
        *m == method.as_str() && path.ends_with(suffix.as_str()) && *left > 0
    }) {
        failure.2 -= 1;
        return status_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            "injected failure".into(),
        );
    }
    if method == Method::GET
        && let Some(list) = discovery(&inner, &path)
    {
        return respond(StatusCode::OK, &list);
    }
    let Some(t) = target(&inner, &path) else {
        return status_error(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("{path} is not served"),
        );
    };
    let served = inner.served[t.resource].clone();
    let namespace = t.namespace.clone().unwrap_or_default();
    let selector = query.get("labelSelector").cloned().unwrap_or_default();
    let in_scope = |(r, ns, _): &(usize, String, String), o: &Value| {
        *r == t.resource
            && (t.namespace.is_none() || *ns == namespace)
            && selector_matches(&selector, o)
    };
    let key = (
        t.resource,
        namespace.clone(),
        t.name.clone().unwrap_or_default(),
    );
    let not_found = || {
        status_error(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("{} {:?} not found", served.plural, key.2),
        )
    };
    match (method, &t.name) {
        (Method::GET, None)
            if matches!(query.get("watch").map(String::as_str), Some("true" | "1")) =>
        {
            let from: u64 = query
                .get("resourceVersion")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let backlog: VecDeque<Change> = inner
                .history
                .iter()
                .filter(|c| c.revision > from)
                .filter(|c| in_scope(&(c.resource, c.namespace.clone(), String::new()), &c.object))
                .cloned()
                .collect();
            let live = shared.changes.subscribe();
            drop(inner);
            let (resource, scope) = (t.resource, t.namespace.clone());
            let matches = move |c: &Change| {
                c.resource == resource
                    && scope.as_ref().is_none_or(|ns| *ns == c.namespace)
                    && selector_matches(&selector, &c.object)
            };
            let stream = futures::stream::unfold(
                (backlog, live, matches),
                |(mut backlog, mut live, matches)| async move {
                    let change = match backlog.pop_front() {
                        Some(change) => change,
                        None => loop {
                            match live.recv().await {
                                Ok(c) if c.revision > 0 && matches(&c) => break c,
                                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => continue,
                                Err(broadcast::error::RecvError::Closed) => return None,
                            }
                        },
                    };
                    let line = format!(
                        "{}\n",
                        json!({"type": change.type_, "object": change.object})
                    );
                    Some((Ok::<_, Infallible>(line), (backlog, live, matches)))
                },
            );
            Response::builder()
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from_stream(stream))
                .expect("a valid response")
        }
        (Method::GET, None) => {
            let items: Vec<Value> = inner
                .objects
                .iter()
                .filter(|(k, o)| in_scope(k, o))
                .map(|(_, o)| o.clone())
                .collect();
            let list = json!({
                "apiVersion": served.api_version, "kind": format!("{}List", served.kind),
                "metadata": {"resourceVersion": inner.revision.to_string()}, "items": items,
            });
            respond(StatusCode::OK, &list)
        }
        (Method::GET, Some(_)) => match inner.objects.get(&key) {
            Some(object) => respond(StatusCode::OK, object),
            None => not_found(),
        },
        (Method::POST, None) => {
            let mut object = body;
            if object["metadata"]["name"].is_null() {
                let prefix = object["metadata"]["generateName"]
                    .as_str()
                    .unwrap_or("object-");
                object["metadata"]["name"] = format!("{prefix}{}", inner.revision + 1).into();
            }
            let name = object["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            if inner
                .objects
                .contains_key(&(t.resource, namespace.clone(), name.clone()))
            {
                return status_error(
                    StatusCode::CONFLICT,
                    "AlreadyExists",
                    format!("{} {name:?} already exists", served.plural),
                );
            }
            let object = inner.commit(&shared.changes, t.resource, &namespace, object, "ADDED");
            respond(StatusCode::CREATED, &object)
        }
        (Method::PUT, Some(_)) => {
            let Some(existing) = inner.objects.get(&key).cloned() else {
                return not_found();
            };
            let sent_version = &body["metadata"]["resourceVersion"];
            if !sent_version.is_null() && *sent_version != existing["metadata"]["resourceVersion"] {
                return status_error(
                    StatusCode::CONFLICT,
                    "Conflict",
                    "the object has been modified; please apply your changes to the latest version"
                        .into(),
                );
            }
            let mut object = body;
            if t.status {
                let status = object["status"].clone();
                object = existing;
                object["status"] = status;
            } else if !existing["status"].is_null() {
                object["status"] = existing["status"].clone();
            }
            let object = inner.commit(&shared.changes, t.resource, &namespace, object, "MODIFIED");
            respond(StatusCode::OK, &object)
        }
        (Method::PATCH, Some(_)) => {
            let existing = inner.objects.get(&key).cloned();
            let mut object = match (&existing, content_type.as_str()) {
                (Some(existing), _) => existing.clone(),
                (None, "application/apply-patch+yaml") if !t.status => {
                    json!({"metadata": {"name": key.2}})
                }
                (None, _) => return not_found(),
            };
            match content_type.as_str() {
                "application/apply-patch+yaml" => {
                    if !query.contains_key("fieldManager") {
                        return status_error(
                            StatusCode::BAD_REQUEST,
                            "BadRequest",
                            "server-side apply needs a fieldManager".into(),
                        );
                    }
                    if t.status {
                        for (k, v) in body["status"].as_object().into_iter().flatten() {
                            object["status"][k] = v.clone();
                        }
                    } else {
                        for (k, v) in body.as_object().into_iter().flatten() {
                            if k != "metadata" {
                                object[k] = v.clone();
                            }
                        }
                    }
                }
                "application/merge-patch+json" => {
                    let mut patch = body;
                    if let Some(p) = patch.as_object_mut() {
                        p.remove("metadata");
                        if !t.status {
                            p.remove("status");
                        }
                    }
                    merge_patch(&mut object, &patch);
                }
                other => {
                    return status_error(
                        StatusCode::UNSUPPORTED_MEDIA_TYPE,
                        "UnsupportedMediaType",
                        format!("patch type {other:?} is not supported by the fake"),
                    );
                }
            }
            if existing.as_ref() == Some(&object) {
                return respond(StatusCode::OK, &object); // A no-op: no new revision.
            }
            let type_ = if existing.is_some() {
                "MODIFIED"
            } else {
                "ADDED"
            };
            let object = inner.commit(&shared.changes, t.resource, &namespace, object, type_);
            respond(StatusCode::OK, &object)
        }
        (Method::DELETE, Some(_)) => match inner.objects.get(&key).cloned() {
            Some(object) => {
                let object =
                    inner.commit(&shared.changes, t.resource, &namespace, object, "DELETED");
                respond(StatusCode::OK, &object)
            }
            None => not_found(),
        },
        (method, _) => status_error(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            format!("{method} {path}"),
        ),
    }
}

/// One RBAC rule, with the namespace it is limited to (a Role's) or none (a ClusterRole's).
struct Rule {
    namespace: Option<String>,
    groups: Vec<String>,
    resources: Vec<String>,
    verbs: Vec<String>,
}

fn rules(rbac_yaml: &str) -> Vec<Rule> {
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s.as_str().map(str::to_owned))
            .collect()
    };
    let mut rules = Vec::new();
    for document in serde_yaml::Deserializer::from_str(rbac_yaml) {
        let object: Value = serde::Deserialize::deserialize(document).unwrap();
        let namespace = match object["kind"].as_str() {
            Some("ClusterRole") => None,
            Some("Role") => object["metadata"]["namespace"].as_str().map(str::to_owned),
            _ => continue,
        };
        for rule in object["rules"].as_array().into_iter().flatten() {
            rules.push(Rule {
                namespace: namespace.clone(),
                groups: strings(&rule["apiGroups"]),
                resources: strings(&rule["resources"]),
                verbs: strings(&rule["verbs"]),
            });
        }
    }
    rules
}

/// (group, resource[/subresource], namespace, verb) of a resource request; `None` for discovery.
fn authorization(request: &Recorded) -> Option<(String, String, Option<String>, String)> {
    let segments: Vec<&str> = request.path.trim_matches('/').split('/').collect();
    let (group, rest) = match segments.as_slice() {
        ["api", _, rest @ ..] => ("", rest),
        ["apis", group, _, rest @ ..] => (*group, rest),
        _ => return None,
    };
    let (namespace, rest) = match rest {
        ["namespaces", namespace, rest @ ..] if !rest.is_empty() => {
            (Some(namespace.to_string()), rest)
        }
        rest => (None, rest),
    };
    let (resource, named) = match rest {
        [] => return None,
        [plural] => (plural.to_string(), false),
        [plural, _] => (plural.to_string(), true),
        [plural, _, sub, ..] => (format!("{plural}/{sub}"), true),
    };
    let verb = match (request.method.as_str(), named) {
        ("GET", true) => "get",
        ("GET", false)
            if request
                .query
                .get("watch")
                .is_some_and(|w| w == "true" || w == "1") =>
        {
            "watch"
        }
        ("GET", false) => "list",
        ("POST", _) => "create",
        ("PUT", _) => "update",
        ("PATCH", _) => "patch",
        ("DELETE", _) => "delete",
        (other, _) => other,
    };
    Some((group.to_owned(), resource, namespace, verb.to_owned()))
}

impl FakeKube {
    /// The requests received so far that the ClusterRoles and Roles in `rbac_yaml` do not allow.
    pub fn forbidden_by(&self, rbac_yaml: &str) -> Vec<String> {
        let rules = rules(rbac_yaml);
        self.requests()
            .iter()
            .filter_map(|r| authorization(r).map(|a| (r, a)))
            .filter(|(_, (group, resource, namespace, verb))| {
                !rules.iter().any(|rule| {
                    rule.groups.contains(group)
                        && rule.resources.contains(resource)
                        && rule.verbs.contains(verb)
                        && (rule.namespace.is_none() || rule.namespace == *namespace)
                })
            })
            .map(|(r, (_, _, _, verb))| format!("{verb} {} {}", r.method, r.path))
            .collect()
    }
}
