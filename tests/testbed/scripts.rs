//! The test bed's scripts, as a user meets them: a second `up` reuses the
//! running control plane, a stale state folder from a killed run is cleaned,
//! a dying control-plane process is named with its log, a missing tool is
//! named with how to install it. Each test uses its own state folder.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::support;

fn script(name: &str) -> PathBuf {
    support::repo_root().join("tests/bed").join(name)
}

fn temp_dir(tag: &str) -> PathBuf {
    let dir = support::repo_root().join("target/test-scripts").join(format!("{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

fn cluster_sh(state: &Path, args: &[&str]) -> Output {
    Command::new("bash")
        .arg(script("cluster.sh"))
        .args(args)
        .env("CLUSTERAPP_STATE", state)
        .output()
        .expect("cluster.sh")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// PIDs recorded in a state folder's `pids` file.
fn recorded_pids(state: &Path) -> Vec<(String, i32)> {
    std::fs::read_to_string(state.join("pids"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (name, pid) = l.split_once(' ')?;
            Some((name.to_string(), pid.trim().parse().ok()?))
        })
        .collect()
}

fn alive(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && std::fs::read_to_string(format!("/proc/{pid}/stat")).map(|s| !s.contains(") Z ")).unwrap_or(false)
}

/// Stops the control plane of `state` when dropped, so a failing assertion
/// leaves nothing running.
struct Down(PathBuf);
impl Drop for Down {
    fn drop(&mut self) {
        let _ = cluster_sh(&self.0, &["down"]);
    }
}

#[test]
fn up_twice_reuses_and_a_stale_state_folder_is_cleaned() {
    let state = temp_dir("reuse");
    let _down = Down(state.clone());

    let first = cluster_sh(&state, &["up"]);
    assert!(first.status.success(), "first up failed: {}", text(&first.stderr));
    let last = text(&first.stdout).lines().last().unwrap_or_default().to_string();
    assert_eq!(last, format!("KUBECONFIG={}", state.join("admin.kubeconfig").display()));
    let pids = recorded_pids(&state);
    let names: Vec<&str> = pids.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler"]);

    let second = cluster_sh(&state, &["up"]);
    assert!(second.status.success());
    assert!(text(&second.stderr).contains("reusing"), "second up did not reuse: {}", text(&second.stderr));
    assert_eq!(recorded_pids(&state), pids, "second up started new processes");

    // A killed run leaves its state folder behind: the next up cleans it.
    for (_, pid) in &pids {
        let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
    }
    let third = cluster_sh(&state, &["up"]);
    assert!(third.status.success(), "up after kill -9 failed: {}", text(&third.stderr));
    assert!(text(&third.stderr).contains("cleaning a stale control plane"));
    let fresh = recorded_pids(&state);
    assert_eq!(fresh.len(), 4);
    assert!(fresh.iter().all(|(_, p)| alive(*p)));

    let down = cluster_sh(&state, &["down"]);
    assert!(down.status.success());
    assert!(fresh.iter().all(|(_, p)| !alive(*p)), "down left processes running");
    assert!(!state.join("pids").exists());
}

#[test]
fn a_dying_control_plane_process_is_named_with_its_log() {
    let state = temp_dir("dying");
    let _down = Down(state.clone());
    let out = Command::new("bash")
        .arg(script("cluster.sh"))
        .arg("up")
        .env("CLUSTERAPP_STATE", &state)
        // an argument kube-apiserver refuses makes it exit at once
        .env("CLUSTERAPP_APISERVER_EXTRA_ARGS", "--no-such-flag-for-this-test")
        .output()
        .expect("cluster.sh");
    let err = text(&out.stderr);
    assert!(!out.status.success(), "up must fail when kube-apiserver dies");
    let log = state.join("logs/kube-apiserver.log");
    assert!(err.contains("kube-apiserver"), "message does not name the process: {err}");
    assert!(err.contains(&log.display().to_string()), "message does not name the log: {err}");
    assert!(std::fs::read_to_string(&log).expect("log").contains("no-such-flag-for-this-test"));
    // what had started (etcd) was stopped again
    assert!(recorded_pids(&state).iter().all(|(_, p)| !alive(*p)));
}

/// A folder of symlinks to just these system tools, to use as PATH.
fn path_with_only(tag: &str, tools: &[&str]) -> PathBuf {
    let bin = temp_dir(tag);
    for tool in tools {
        let real = ["/usr/bin", "/bin"].iter().map(|d| Path::new(d).join(tool)).find(|p| p.exists()).expect("tool");
        std::os::unix::fs::symlink(real, bin.join(tool)).expect("symlink");
    }
    bin
}

#[test]
fn a_missing_go_toolchain_is_named_with_how_to_install_it() {
    let cache = temp_dir("nogo-cache");
    let bin = path_with_only("nogo", &["bash", "dirname", "sed", "grep", "cat", "mkdir", "rm", "mv", "nproc"]);
    let out = Command::new(bin.join("bash"))
        .arg(script("install.sh"))
        .env("CLUSTERAPP_CACHE", &cache)
        .env("PATH", &bin)
        .output()
        .expect("install.sh");
    let err = text(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("'go' is not on PATH"), "unclear message: {err}");
    assert!(err.contains("install it"), "message does not say how to install: {err}");

    let check = Command::new("bash")
        .arg(script("install.sh"))
        .arg("--check")
        .env("CLUSTERAPP_CACHE", &cache)
        .output()
        .expect("install.sh --check");
    assert!(!check.status.success());
    assert!(text(&check.stderr).contains("not built yet: etcd"));
}

#[test]
fn a_missing_debian_tool_is_named_with_its_package() {
    // cluster.sh needs openssl and curl; hide them behind a PATH without them.
    let bin = path_with_only("nossl", &["bash", "dirname", "mkdir", "tr", "grep", "cat", "sed"]);
    let out = Command::new(bin.join("bash"))
        .arg(script("cluster.sh"))
        .arg("status")
        .env("PATH", &bin)
        .env("CLUSTERAPP_STATE", bin.join("state"))
        .output()
        .expect("cluster.sh");
    let err = text(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("'openssl' is missing") && err.contains("apt-get install openssl"), "unclear message: {err}");
}

#[test]
fn a_second_install_builds_nothing() {
    let paths = support::bed_paths();
    let apiserver = paths.kube_bin.join("kube-apiserver");
    let before =
        std::fs::metadata(&apiserver).and_then(|m| m.modified()).expect("kube-apiserver is built (make tools)");
    let out = Command::new("bash").arg(script("install.sh")).output().expect("install.sh");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("all binaries cached, nothing to build"), "{}", text(&out.stderr));
    let after = std::fs::metadata(&apiserver).and_then(|m| m.modified()).expect("kube-apiserver");
    assert_eq!(before, after, "kube-apiserver was rebuilt");
    let dirs: Vec<String> = text(&out.stdout).lines().map(str::to_string).collect();
    assert_eq!(dirs.len(), 3);
    assert!(dirs.contains(&paths.kube_bin.display().to_string()));
    assert!(dirs.contains(&paths.helm_bin.display().to_string()));
}

#[test]
fn a_port_taken_under_us_is_retried_with_other_ports() {
    let state = temp_dir("porttaken");
    let _down = Down(state.clone());
    // Hold a port and force kube-apiserver onto it (a later flag wins): each
    // attempt hits "address already in use", is retried, and after the last
    // attempt the failure is reported.
    let holder = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = holder.local_addr().expect("addr").port();
    let out = Command::new("bash")
        .arg(script("cluster.sh"))
        .arg("up")
        .env("CLUSTERAPP_STATE", &state)
        .env("CLUSTERAPP_APISERVER_EXTRA_ARGS", format!("--secure-port={port}"))
        .output()
        .expect("cluster.sh");
    let err = text(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(err.matches("retrying with other ports").count(), 2, "{err}");
    assert!(err.contains("could not bind its port"), "{err}");
    assert!(recorded_pids(&state).iter().all(|(_, p)| !alive(*p)));
    drop(holder);
}

/// A test binary that ends and the next run of the same binary (same state
/// folder) right after: the first owner's watchdog must not stop the
/// control plane the second run is using.
#[test]
fn a_finished_owners_watchdog_leaves_the_next_runs_control_plane_alone() {
    let state = temp_dir("handover");
    let _down = Down(state.clone());
    let mut first_owner = Command::new("sleep").arg("600").spawn().expect("sleep");
    let first = cluster_sh(&state, &["up", "--owner-pid", &first_owner.id().to_string()]);
    assert!(first.status.success(), "first up failed: {}", text(&first.stderr));

    // The first owner exits; the next run comes up at once with its own owner.
    let _ = first_owner.kill();
    let _ = first_owner.wait();
    let mut second_owner = Command::new("sleep").arg("600").spawn().expect("sleep");
    let second = cluster_sh(&state, &["up", "--owner-pid", &second_owner.id().to_string()]);
    assert!(second.status.success(), "second up failed: {}", text(&second.stderr));
    let pids = recorded_pids(&state);
    assert_eq!(pids.len(), 4);

    // Well past the watchdog's poll interval: still the same, running processes.
    std::thread::sleep(std::time::Duration::from_secs(4));
    assert_eq!(recorded_pids(&state), pids, "the control plane was restarted or stopped");
    assert!(pids.iter().all(|(_, p)| alive(*p)), "a control-plane process was stopped by the old watchdog");
    let status = cluster_sh(&state, &["status"]);
    assert!(status.status.success(), "not running: {}", text(&status.stderr));

    // The second owner's watchdog still works: it stops everything when its owner exits.
    let _ = second_owner.kill();
    let _ = second_owner.wait();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while pids.iter().any(|(_, p)| alive(*p)) {
        assert!(std::time::Instant::now() < deadline, "the second owner's watchdog did not stop the control plane");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}
