//! Runs what the Helm chart renders on this machine: each container of a rendered Deployment, Job or test Pod
//! becomes a process of the real binary it names, with exactly the rendered `args` and `env`, except for what only
//! a cluster provides, which the test stands in for:
//! - `secretKeyRef` values and Secret volumes come from Secrets the test supplies (an unknown one is a failure);
//!   ConfigMap volumes and `configMapKeyRef` come from the rendered ConfigMaps; emptyDirs are fresh directories;
//! - mount paths in values become the local directories holding those files;
//! - the broker's container ports get free local ports: listen addresses (`0.0.0.0:50051`) and client URLs naming
//!   a rendered Service (`https://rel-jobbroker:50051`) are rewritten to them.
//!
//! Anything else the chart might render (another `valueFrom`, volume type or `subPath`) fails the test by name, so
//! nothing the pods would get in a cluster is silently left out. The chart itself is rendered by
//! `helm/tests/chart_check.py render`. This module asserts nothing about the chart: the tests do.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{ExitStatus, Output, Stdio},
    time::Duration,
};

use serde_json::Value;

/// Runs `helm/tests/chart_check.py` with `args` (it installs its pinned tools into the target directory on first
/// use) and returns its stdout; panics with its stderr if it fails.
pub fn chart_tool(args: &[&str]) -> Vec<u8> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../helm/tests/chart_check.py");
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    // Its tools live in this build's target directory (CARGO_TARGET_TMPDIR is `<target>/tmp`).
    let target = Path::new(env!("CARGO_TARGET_TMPDIR")).parent().expect("the target directory");
    let mut command = std::process::Command::new(&python);
    command.arg(&script).args(args).env("CARGO_TARGET_DIR", target).stdin(Stdio::null());
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("running {python} {}: {e} (the chart checks need Python 3.10+)", script.display()));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "chart_check.py {args:?} failed ({}):\n{stderr}", output.status);
    eprint!("{stderr}");
    output.stdout
}

/// The objects the chart renders for one values file.
pub struct Rendered {
    pub namespace: String,
    pub objects: Vec<Value>,
}

impl Rendered {
    /// Renders with `values`: `default`, or a file name in `helm/jobbroker/ci/`.
    pub fn render(values: &str) -> Rendered {
        let document: Value = serde_json::from_slice(&chart_tool(&["render", values])).expect("render prints JSON");
        Rendered {
            namespace: document["namespace"].as_str().expect("a namespace").to_owned(),
            objects: document["objects"].as_array().expect("a list of objects").clone(),
        }
    }

    /// The one object of `kind` labelled with `component` (`broker`, `worker`, `migrations`, `test`).
    pub fn object(&self, kind: &str, component: &str) -> &Value {
        let found: Vec<&Value> = self
            .objects
            .iter()
            .filter(|o| o["kind"] == kind && o["metadata"]["labels"]["app.kubernetes.io/component"] == component)
            .collect();
        assert_eq!(found.len(), 1, "expected one {kind} of component {component}, the chart rendered {}", found.len());
        found[0]
    }

    fn named(&self, kind: &str, name: &str) -> Option<&Value> {
        self.objects.iter().find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
    }

    /// The Service a client host name means: `name`, `name.ns`, `name.ns.svc` or `name.ns.svc.cluster.local`.
    fn service(&self, host: &str) -> Option<&Value> {
        let suffixes = ["", ".svc", ".svc.cluster.local"].map(|s| format!(".{}{s}", self.namespace));
        let name = suffixes.iter().find_map(|suffix| host.strip_suffix(suffix.as_str())).unwrap_or(host);
        self.named("Service", name)
    }
}

/// The pod spec of a Deployment or Job (its template) or of a Pod.
pub fn pod_spec(object: &Value) -> &Value {
    match object["kind"].as_str() {
        Some("Pod") => &object["spec"],
        _ => &object["spec"]["template"]["spec"],
    }
}

/// Init containers, then containers, as the kubelet starts them.
pub fn containers(object: &Value) -> Vec<&Value> {
    let spec = pod_spec(object);
    let list = |key: &str| spec[key].as_array().map(|c| c.iter().collect::<Vec<_>>()).unwrap_or_default();
    [list("initContainers"), list("containers")].concat()
}

pub fn container<'a>(object: &'a Value, name: &str) -> &'a Value {
    let found = containers(object).into_iter().find(|c| c["name"] == name);
    found.unwrap_or_else(|| panic!("no container {name} in {}", object["metadata"]["name"]))
}

/// The rendered value of environment variable `name` of `container` (literal values only).
pub fn env_value<'a>(container: &'a Value, name: &str) -> Option<&'a str> {
    let env = container["env"].as_array()?;
    env.iter().find(|e| e["name"] == name)?["value"].as_str()
}

/// A rendered release running locally: the Secrets the test supplies, a scratch directory, and a free local port
/// for each container port of the broker.
pub struct LocalCluster {
    pub rendered: Rendered,
    secrets: BTreeMap<(String, String), Vec<u8>>,
    dir: PathBuf,
    broker_ports: BTreeMap<u64, u16>,
}

impl LocalCluster {
    /// `secrets`: `(secret name, key, content)` for every Secret the rendered pods read.
    pub fn new(rendered: Rendered, secrets: Vec<(&str, &str, Vec<u8>)>) -> LocalCluster {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("helm-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("creating the scratch directory");
        let broker_ports = container(rendered.object("Deployment", "broker"), "broker")["ports"]
            .as_array()
            .expect("the broker declares its ports")
            .iter()
            .map(|p| (p["containerPort"].as_u64().expect("a port number"), free_port()))
            .collect();
        let secrets = secrets.into_iter().map(|(name, key, value)| ((name.into(), key.into()), value)).collect();
        LocalCluster { rendered, secrets, dir, broker_ports }
    }

    /// The local port standing in for the broker's container port `port`.
    pub fn local_port(&self, port: u64) -> u16 {
        *self.broker_ports.get(&port).unwrap_or_else(|| panic!("the broker declares no container port {port}"))
    }

    /// Starts container `name` of `object` with its rendered command, args and environment.
    pub fn start(&self, object: &Value, name: &str) -> Process {
        let label = format!("{}/{}", object["metadata"]["name"].as_str().unwrap_or("?"), name);
        Process::spawn(self.command(object, name, None), &self.dir, &label)
    }

    /// Runs container `name` of `object` with `args` instead of its own (like `kubectl exec` into it).
    pub async fn exec(&self, object: &Value, name: &str, args: &[&str], timeout: Duration) -> Output {
        let mut command = self.command(object, name, Some(args));
        let run = command.stdin(Stdio::null()).kill_on_drop(true).output();
        let output =
            tokio::time::timeout(timeout, run).await.unwrap_or_else(|_| panic!("{args:?} ran over {timeout:?}"));
        output.expect("running the container's binary")
    }

    /// The process container `name` of `object` would run, `args` replacing the rendered ones if given.
    pub fn command(&self, object: &Value, name: &str, args: Option<&[&str]>) -> tokio::process::Command {
        let spec = container(object, name);
        let pod = format!("{}-{name}", object["metadata"]["name"].as_str().expect("a name"));
        let mounts = self.mount_volumes(object, spec, &pod);
        let program = spec["command"][0].as_str().expect("every container of the chart names its command");
        let mut command = tokio::process::Command::new(binary(program));
        let rendered_args: Vec<&str> = spec["args"]
            .as_array()
            .map_or(Vec::new(), |a| a.iter().map(|arg| arg.as_str().expect("string args")).collect());
        command.args(args.unwrap_or(&rendered_args));
        // The container's environment and nothing of the test's (PATH stands in for the image's).
        command.env_clear().env("PATH", std::env::var_os("PATH").unwrap_or_default());
        for entry in spec["env"].as_array().into_iter().flatten() {
            let var = entry["name"].as_str().expect("an env name");
            command.env(var, self.env_entry(entry, &mounts, var));
        }
        command
    }

    fn env_entry(&self, entry: &Value, mounts: &[(String, PathBuf)], var: &str) -> String {
        if let Some(value) = entry["value"].as_str() {
            return self.rewrite(value, mounts);
        }
        let from = &entry["valueFrom"];
        if let Some(secret) = from.get("secretKeyRef") {
            let value = self.secret(secret["name"].as_str().unwrap_or(""), secret["key"].as_str().unwrap_or(""));
            return String::from_utf8(value.clone()).expect("secret values are text");
        }
        if let Some(config) = from.get("configMapKeyRef") {
            let map = self.config_map(config["name"].as_str().unwrap_or(""));
            let key = config["key"].as_str().unwrap_or("");
            return map["data"][key].as_str().unwrap_or_else(|| panic!("ConfigMap has no key {key}")).to_owned();
        }
        panic!("env {var}: the test cannot stand in for {from} (extend tests/helm/mod.rs)");
    }

    fn secret(&self, name: &str, key: &str) -> &Vec<u8> {
        self.secrets.get(&(name.to_owned(), key.to_owned())).unwrap_or_else(|| {
            panic!(
                "the pods read key {key} of Secret {name}, which the test does not supply: give it in LocalCluster::new"
            )
        })
    }

    fn config_map(&self, name: &str) -> &Value {
        self.rendered.named("ConfigMap", name).unwrap_or_else(|| panic!("no rendered ConfigMap {name}"))
    }

    /// Writes each volume the container mounts into the scratch directory; returns `(mountPath, local dir)`.
    fn mount_volumes(&self, object: &Value, container: &Value, pod: &str) -> Vec<(String, PathBuf)> {
        let volumes = pod_spec(object)["volumes"].as_array().cloned().unwrap_or_default();
        let mut mounts = Vec::new();
        for mount in container["volumeMounts"].as_array().into_iter().flatten() {
            let name = mount["name"].as_str().expect("a volume name");
            assert!(mount.get("subPath").is_none(), "volume {name}: subPath is not supported by this test");
            let volume = volumes.iter().find(|v| v["name"] == name).expect("a mounted volume is declared");
            let local = self.dir.join(pod).join(name);
            std::fs::create_dir_all(&local).expect("creating a volume directory");
            let files: Vec<(String, Vec<u8>)> = if let Some(secret) = volume.get("secret") {
                let secret_name = secret["secretName"].as_str().expect("a secret name");
                match secret["items"].as_array() {
                    Some(items) => items
                        .iter()
                        .map(|item| {
                            let key = item["key"].as_str().expect("an item key");
                            (item["path"].as_str().expect("a path").to_owned(), self.secret(secret_name, key).clone())
                        })
                        .collect(),
                    None => self
                        .secrets
                        .iter()
                        .filter(|((secret, _), _)| secret == secret_name)
                        .map(|((_, key), value)| (key.clone(), value.clone()))
                        .collect(),
                }
            } else if let Some(config) = volume.get("configMap") {
                assert!(config.get("items").is_none(), "volume {name}: ConfigMap items are not supported by this test");
                let map = self.config_map(config["name"].as_str().expect("a ConfigMap name"));
                let data = map["data"].as_object().expect("ConfigMap data");
                data.iter()
                    .map(|(key, value)| (key.clone(), value.as_str().expect("text").as_bytes().to_vec()))
                    .collect()
            } else if volume.get("emptyDir").is_some() {
                Vec::new()
            } else {
                panic!("volume {name}: the test cannot stand in for {volume}");
            };
            for (path, content) in files {
                std::fs::write(local.join(path), content).expect("writing a volume file");
            }
            mounts.push((mount["mountPath"].as_str().expect("a mount path").to_owned(), local));
        }
        mounts
    }

    /// A literal env value as it must read here: mount paths → local directories, the broker's listen addresses
    /// and URLs of rendered Services → 127.0.0.1 and the local ports.
    fn rewrite(&self, value: &str, mounts: &[(String, PathBuf)]) -> String {
        for (mount_path, local) in mounts {
            if let Some(rest) = value.strip_prefix(mount_path.as_str()).filter(|r| r.is_empty() || r.starts_with('/')) {
                return format!("{}{rest}", local.display());
            }
        }
        if let Ok(addr) = value.parse::<SocketAddr>() {
            return match self.broker_ports.get(&u64::from(addr.port())) {
                Some(local) => format!("127.0.0.1:{local}"),
                None => value.to_owned(),
            };
        }
        value.split(',').map(|part| self.rewrite_url(part)).collect::<Vec<_>>().join(",")
    }

    fn rewrite_url(&self, text: &str) -> String {
        let Ok(url) = url::Url::parse(text) else { return text.to_owned() };
        let (Some(host), Some(port)) = (url.host_str(), url.port()) else { return text.to_owned() };
        let Some(service) = self.rendered.service(host) else { return text.to_owned() };
        let ports = service["spec"]["ports"].as_array().expect("service ports");
        let target = ports.iter().find(|p| p["port"] == port).unwrap_or_else(|| panic!("{text}: no such Service port"));
        let broker = container(self.rendered.object("Deployment", "broker"), "broker");
        let container_port = broker["ports"]
            .as_array()
            .expect("broker ports")
            .iter()
            .find(|p| p["name"] == target["targetPort"] || p["containerPort"] == target["targetPort"])
            .unwrap_or_else(|| panic!("{text}: Service targetPort {} is no broker port", target["targetPort"]));
        let local = self.local_port(container_port["containerPort"].as_u64().expect("a port"));
        format!("{}://127.0.0.1:{local}{}", url.scheme(), url.path().trim_end_matches('/'))
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("scratch directory kept: {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// The workspace binary a container command names (`/usr/local/bin/broker` → target/…/broker). `cargo test
/// --workspace` builds them all; a lone `cargo test -p broker` may not have built the others yet.
fn binary(program: &str) -> PathBuf {
    let name = Path::new(program).file_name().expect("a program path").to_owned();
    let path = Path::new(env!("CARGO_BIN_EXE_broker")).with_file_name(name);
    assert!(
        path.exists(),
        "{} is not built: run `cargo build --workspace` (or `cargo test --workspace`, which builds every binary)",
        path.display()
    );
    path
}

fn free_port() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("binding 127.0.0.1:0");
    listener.local_addr().expect("the bound address").port()
}

/// A started container: its process and its log (stdout and stderr), printed if the test fails.
pub struct Process {
    label: String,
    child: tokio::process::Child,
    log: PathBuf,
}

impl Process {
    fn spawn(mut command: tokio::process::Command, dir: &Path, label: &str) -> Process {
        let log = dir.join(format!("{}.log", label.replace('/', "_")));
        let file = std::fs::File::create(&log).expect("creating a log file");
        command.stdin(Stdio::null()).stdout(file.try_clone().expect("a log handle")).stderr(file).kill_on_drop(true);
        let child = command.spawn().unwrap_or_else(|e| panic!("starting {label}: {e}"));
        Process { label: label.to_owned(), child, log }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Panics (showing the log) if the process has exited.
    pub fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().expect("polling a process") {
            panic!("{} exited ({status}):\n{}", self.label, self.log());
        }
    }

    /// Sends SIGTERM, as the kubelet does after preStop, and waits up to `grace` for the exit.
    pub async fn terminate(&mut self, grace: Duration) -> ExitStatus {
        let pid = self.child.id().expect("a running process").to_string();
        let sent = tokio::process::Command::new("kill").args(["-TERM", &pid]).status().await;
        assert!(sent.is_ok_and(|s| s.success()), "kill -TERM {pid} failed");
        match tokio::time::timeout(grace, self.child.wait()).await {
            Ok(status) => status.expect("waiting for a process"),
            Err(_) => panic!("{} outlived its termination grace of {grace:?}:\n{}", self.label, self.log()),
        }
    }

    /// Waits up to `timeout` for the process to exit by itself.
    pub async fn wait(&mut self, timeout: Duration) -> ExitStatus {
        match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(status) => status.expect("waiting for a process"),
            Err(_) => panic!("{} did not finish within {timeout:?}:\n{}", self.label, self.log()),
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        if std::thread::panicking() {
            eprintln!("---- {} log ----\n{}---- end of log ----", self.label, self.log());
        }
    }
}
