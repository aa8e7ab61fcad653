"""deploy/'s manifests as the tests read them: documents, the DaemonSet's containers, and
the kubelet's ``$(VAR)`` expansion of ``args`` from the ConfigMap.

Theory of operation: ``load()`` parses every deploy/*.yaml (PyYAML) into a dict keyed by
kind. ``container(ds, name)`` finds an init or main container. ``env_of(container,
configmap, node_name)`` resolves its env as the kubelet would (``configMapKeyRef`` from the
ConfigMap, ``fieldRef: spec.nodeName``), and ``expand(words, env)`` substitutes
``$(NAME)`` as the kubelet does for ``command`` and ``args`` (``$$`` stays a literal
``$``, an unknown name stays as written). ``host_mounts(ds, container)`` pairs each
volumeMount with its volume's hostPath. Used by tests/deploy and the rehearsal
(tests/runtimes/test_rehearsal.py), which runs the image as these manifests say.
"""
from __future__ import annotations

import glob
import os
import re

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEPLOY_DIR = os.path.join(REPO, "deploy")
_VAR = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def manifest_paths() -> list[str]:
    return sorted(glob.glob(os.path.join(DEPLOY_DIR, "*.yaml")))


def load() -> dict[str, dict]:
    """{kind: document} of deploy/*.yaml (one document of each kind)."""
    docs: dict[str, dict] = {}
    for path in manifest_paths():
        with open(path) as f:
            for doc in yaml.safe_load_all(f):
                if doc:
                    assert doc["kind"] not in docs, f"two {doc['kind']} documents in deploy/"
                    docs[doc["kind"]] = doc
    return docs


def pod_spec(ds: dict) -> dict:
    return ds["spec"]["template"]["spec"]


def container(ds: dict, name: str) -> dict:
    spec = pod_spec(ds)
    for c in spec.get("initContainers", []) + spec["containers"]:
        if c["name"] == name:
            return c
    raise KeyError(f"no container {name!r} in the DaemonSet")


def env_of(c: dict, configmap: dict, node_name: str) -> dict[str, str]:
    env = {}
    for e in c.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
            continue
        src = e["valueFrom"]
        if "configMapKeyRef" in src:
            ref = src["configMapKeyRef"]
            assert ref["name"] == configmap["metadata"]["name"], ref
            env[e["name"]] = configmap["data"][ref["key"]]
        elif src.get("fieldRef", {}).get("fieldPath") == "spec.nodeName":
            env[e["name"]] = node_name
        else:
            raise ValueError(f"env {e['name']}: source {src} is not resolved here")
    return env


def expand(words: list[str], env: dict[str, str]) -> list[str]:
    def one(m):
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))
    return [_VAR.sub(one, str(w)) for w in words]


def host_mounts(ds: dict, c: dict) -> list[dict]:
    """[{name, host_path, mount_path, propagation}] of container ``c``'s volumeMounts."""
    volumes = {v["name"]: v for v in pod_spec(ds)["volumes"]}
    out = []
    for m in c.get("volumeMounts", []):
        v = volumes[m["name"]]
        out.append({"name": m["name"], "host_path": v["hostPath"]["path"], "mount_path": m["mountPath"],
                    "propagation": m.get("mountPropagation", "None"),
                    "read_only": bool(m.get("readOnly"))})
    return out


def option(words: list[str], name: str) -> str | None:
    """The value after ``name`` in a command line, or None."""
    for i, w in enumerate(words):
        if w == name and i + 1 < len(words):
            return words[i + 1]
        if w.startswith(name + "="):
            return w.split("=", 1)[1]
    return None
