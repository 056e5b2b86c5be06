"""Helm and Kubernetes-schema tools for Myelin's chart, driven by `cargo xtask manifests` and
by tests/tests/manifests.rs. Run it with the venv's Python that `cargo xtask setup` creates
(target/python-tools/bin/python).

  render CHART --release NAME --namespace NS [--values-json JSON]
      Prints the chart's manifests as Helm renders them.
  lint CHART
      Prints Helm's lint messages as JSON: [{"severity": "ERROR", "path": "values.yaml"}].
  validate --kubernetes-version V [--kubernetes-version V ...] < manifests.yaml
      Prints, as JSON, every object that does not validate against the Kubernetes OpenAPI
      schemas (strict: unknown fields are errors) of each version V ("latest": the newest the
      schemas know).

Why `render` installs into a stand-in API server: helm-sdkpy (Helm v4's Go library behind a C
shim) exposes install, upgrade and lint, but no `helm template`, no dry run and no client-only
mode. An install renders exactly what `helm template` prints, so the chart is installed into a
minimal API server in this process that answers discovery for the chart's kinds, "not found"
for every object and "created" for every create, with Helm's release storage in memory. The
rendered manifest is then read from the release Helm returns. The server listens on loopback in
a network namespace of this process's own, so nothing leaves it.
"""

import argparse
import asyncio
import ctypes
import fcntl
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# The kinds the chart renders, by API group version: (resource, kind, namespaced). An install of
# a kind missing here fails with Helm's "no matches for kind".
RESOURCES = {
    "v1": [("serviceaccounts", "ServiceAccount", True)],
    "apps/v1": [("daemonsets", "DaemonSet", True)],
    "rbac.authorization.k8s.io/v1": [
        ("clusterroles", "ClusterRole", False),
        ("clusterrolebindings", "ClusterRoleBinding", False),
    ],
}

# Set in the render child: Helm's Go runtime reads the environment once, when the library loads.
RENDER_CHILD_ENV = "MYELIN_CHART_TOOLS_RENDER_CHILD"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    render = sub.add_parser("render")
    render.add_argument("chart")
    render.add_argument("--release", required=True)
    render.add_argument("--namespace", required=True)
    render.add_argument("--values-json", default="{}")
    lint = sub.add_parser("lint")
    lint.add_argument("chart")
    validate = sub.add_parser("validate")
    validate.add_argument("--kubernetes-version", action="append", required=True)
    args = parser.parse_args()

    if args.command == "render":
        if os.environ.get(RENDER_CHILD_ENV):
            print(render_in_private_netns(args), end="")
        else:
            sys.exit(run_render_child())
    elif args.command == "lint":
        print(json.dumps(lint_chart(args.chart)))
    else:
        print(json.dumps(validate_stream(sys.stdin.read(), args.kubernetes_version)))


def run_render_child():
    """Runs this script again with Helm's environment set: memory release storage, and Helm's
    cache, config and data homes in a temp dir, so that nothing outside it is written."""
    with tempfile.TemporaryDirectory(prefix="myelin-chart-tools-") as home:
        env = dict(os.environ)
        env.update(
            {
                RENDER_CHILD_ENV: "1",
                "HELM_DRIVER": "memory",
                "HELM_CACHE_HOME": os.path.join(home, "cache"),
                "HELM_CONFIG_HOME": os.path.join(home, "config"),
                "HELM_DATA_HOME": os.path.join(home, "data"),
                "KUBECONFIG": os.path.join(home, "no-kubeconfig"),
            }
        )
        return subprocess.run([sys.executable, *sys.argv], env=env, check=False).returncode


def render_in_private_netns(args):
    enter_private_netns()
    # Imported only now: loading the library starts Go's threads, which must be born inside the
    # private network namespace.
    import helm_sdkpy

    values = json.loads(args.values_json)
    server = ThreadingHTTPServer(("127.0.0.1", 0), StandInApiServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        config = helm_sdkpy.Configuration(
            namespace=args.namespace, kubeconfig=kubeconfig(server.server_address[1])
        )
        release = asyncio.run(
            helm_sdkpy.Install(config).run(
                args.release, os.path.abspath(args.chart), values=values, wait=False, timeout=60
            )
        )
    finally:
        server.shutdown()
    return release["manifest"]


def enter_private_netns():
    """Moves this process into a new network namespace (with a new user namespace when not
    root) and brings its loopback up."""
    clone_newnet, clone_newuser = 0x40000000, 0x10000000
    flags = clone_newnet if os.geteuid() == 0 else clone_newnet | clone_newuser
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(flags) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"unshare of a private network namespace: {os.strerror(errno)}")
    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(sock, siocgifflags, request))[1]
        fcntl.ioctl(sock, siocsifflags, struct.pack("16sH14x", b"lo", flags | iff_up))


def kubeconfig(port):
    # YAML, not JSON: the shim tells kubeconfig content from a file path by its YAML keys.
    return f"""apiVersion: v1
kind: Config
clusters: [{{name: stand-in, cluster: {{server: "http://127.0.0.1:{port}"}}}}]
users: [{{name: stand-in, user: {{}}}}]
contexts: [{{name: stand-in, context: {{cluster: stand-in, user: stand-in}}}}]
current-context: stand-in
"""


class StandInApiServer(BaseHTTPRequestHandler):
    """Discovery for RESOURCES, 404 for every object, 201 for every create."""

    def log_message(self, format, *args):
        pass

    def do_GET(self):
        path = self.path.split("?")[0]
        if path == "/version":
            return self.send_json(200, {"major": "1", "minor": "34", "gitVersion": "v1.34.0"})
        if path == "/api":
            return self.send_json(200, {"kind": "APIVersions", "versions": ["v1"]})
        if path == "/apis":
            groups = [
                {
                    "name": group_version.split("/")[0],
                    "versions": [{"groupVersion": group_version, "version": "v1"}],
                    "preferredVersion": {"groupVersion": group_version, "version": "v1"},
                }
                for group_version in RESOURCES
                if "/" in group_version
            ]
            return self.send_json(200, {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
        group_version = path.removeprefix("/api/").removeprefix("/apis/")
        if group_version in RESOURCES:
            resources = [
                {
                    "name": name,
                    "singularName": kind.lower(),
                    "namespaced": namespaced,
                    "kind": kind,
                    "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"],
                }
                for name, kind, namespaced in RESOURCES[group_version]
            ]
            return self.send_json(
                200,
                {
                    "kind": "APIResourceList",
                    "apiVersion": "v1",
                    "groupVersion": group_version,
                    "resources": resources,
                },
            )
        return self.send_json(
            404,
            {
                "kind": "Status",
                "apiVersion": "v1",
                "status": "Failure",
                "reason": "NotFound",
                "code": 404,
                "message": f"{path} not found",
            },
        )

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.send(201, self.headers.get("Content-Type", "application/json"), body)

    def send_json(self, code, document):
        self.send(code, "application/json", json.dumps(document).encode())

    def send(self, code, content_type, body):
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def lint_chart(chart):
    import helm_sdkpy

    # Helm's lint.Message carries its error as a Go interface, which the shim's JSON encoding
    # turns into {}: the path and severity are what comes through.
    severities = {0: "UNKNOWN", 1: "INFO", 2: "WARNING", 3: "ERROR"}
    result = asyncio.run(helm_sdkpy.Lint(helm_sdkpy.Configuration()).run(os.path.abspath(chart)))
    return [
        {"severity": severities.get(m["Severity"], str(m["Severity"])), "path": m["Path"]}
        for m in result.get("Messages") or []
    ]


def validate_stream(text, versions):
    import kubernetes_validate
    import yaml
    from kubernetes_validate.utils import latest_version

    failures = []
    documents = [d for d in yaml.safe_load_all(text) if d is not None]
    if not documents:
        failures.append({"object": "", "version": "", "error": "no objects in the input"})
    for document in documents:
        name = f"{document.get('kind')}/{(document.get('metadata') or {}).get('name')}"
        for version in versions:
            version = latest_version() if version == "latest" else version
            try:
                kubernetes_validate.validate(document, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                field = ".".join(str(p) for p in e.absolute_path)
                failures.append({"object": name, "version": version, "error": f"{field}: {e.message}"})
            except kubernetes_validate.SchemaNotFoundError as e:
                failures.append({"object": name, "version": version, "error": e.message})
    return failures


if __name__ == "__main__":
    main()
