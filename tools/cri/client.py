"""A small CRI v1 client: the calls a kubelet makes to run a pod, and nothing more.

Theory of operation: the CRI is a gRPC API (service ``runtime.v1.RuntimeService``) that a
kubelet speaks to a container runtime over a unix socket. ``cri_v1_api.proto`` beside
this file declares the subset we use, with the upstream names and field numbers. It is
compiled when this module is first used, in memory, by ``grpc.protos_and_services``
(grpcio-tools' protoc), so no generated code is kept in the repository.

Why grpcio is a dependency (of the runtime tests only, installed by
scripts/setup-runtimes.sh): containerd's CRI plugin serves only gRPC over HTTP/2, and
Debian 12 has no crictl; speaking HTTP/2 framing, HPACK and gRPC by hand would be far
more code than this whole client. grpcio-tools compiles the proto at run time.

``CriClient`` wraps the stub with keyword-friendly methods: ``run_pod`` (RunPodSandbox
with port mappings and annotations such as the bandwidth ones), ``pod_status`` (the IP
and, verbose, containerd's info JSON with the netns path and the CNI result),
``create_container`` / ``start_container`` / ``exec_sync`` for a busybox container, and
``stop_pod`` / ``remove_pod``. Every call has a deadline, so a stuck runtime fails a test
instead of hanging it.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(os.path.dirname(_HERE))
_PROTO = "tools/cri/cri_v1_api.proto"  # relative to the repository root, on sys.path

_cached = None


def load_api():
    """(messages module, services module) compiled from the proto; cached per process."""
    global _cached
    if _cached is None:
        try:
            import grpc
        except ImportError as exc:  # pragma: no cover - depends on the machine
            raise RuntimeError(
                "the CRI client needs grpcio and grpcio-tools "
                "(scripts/setup-runtimes.sh installs them)") from exc
        if _ROOT not in sys.path:
            sys.path.insert(0, _ROOT)
        try:
            _cached = grpc.protos_and_services(_PROTO)
        except (ImportError, NotImplementedError) as exc:  # pragma: no cover
            raise RuntimeError(
                f"cannot compile {_PROTO}: grpcio-tools is missing or too old ({exc})") from exc
    return _cached


@dataclass
class PortMapping:
    """One hostPort mapping of a pod sandbox."""
    container_port: int
    host_port: int
    protocol: str = "TCP"   # TCP, UDP or SCTP
    host_ip: str = ""


@dataclass
class PodSpec:
    """What RunPodSandbox needs to create a sandbox."""
    name: str
    namespace: str = "default"
    uid: str = ""
    port_mappings: list[PortMapping] = field(default_factory=list)
    annotations: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    log_directory: str = ""


class CriError(RuntimeError):
    """A CRI call failed; the message names the call and the runtime's error."""


class CriClient:
    """A CRI v1 RuntimeService client over a unix socket."""

    def __init__(self, socket_path: str, timeout_s: float = 60.0):
        self.pb, services = load_api()  # first: a clear error when grpcio is missing
        import grpc
        self.socket_path = socket_path
        self.timeout_s = timeout_s
        self._channel = grpc.insecure_channel(f"unix://{socket_path}")
        self._stub = services.RuntimeServiceStub(self._channel)
        self._grpc = grpc

    def close(self) -> None:
        self._channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _call(self, name: str, request, timeout_s: float | None = None):
        try:
            return getattr(self._stub, name)(request, timeout=timeout_s or self.timeout_s)
        except self._grpc.RpcError as exc:
            raise CriError(f"CRI {name} failed: {exc.code().name}: {exc.details()}") from exc

    # -- runtime -----------------------------------------------------------------------

    def version(self, timeout_s: float | None = None):
        return self._call("Version", self.pb.VersionRequest(version="v1"), timeout_s)

    def wait_ready(self, timeout_s: float = 30.0, proc=None) -> None:
        """Polls Version until the runtime answers; ``proc`` (a Popen) failing aborts."""
        deadline = time.monotonic() + timeout_s
        last = None
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise CriError(f"the runtime exited with status {proc.returncode} "
                               "before answering Version")
            if os.path.exists(self.socket_path):
                try:
                    self.version(timeout_s=2.0)
                    return
                except CriError as exc:
                    last = exc
            time.sleep(0.1)
        raise CriError(f"no CRI answer on {self.socket_path} within {timeout_s} s: {last}")

    # -- pod sandboxes -----------------------------------------------------------------

    def sandbox_config(self, spec: PodSpec):
        pb = self.pb
        return pb.PodSandboxConfig(
            metadata=pb.PodSandboxMetadata(name=spec.name, namespace=spec.namespace,
                                           uid=spec.uid or f"uid-{spec.name}", attempt=0),
            hostname=spec.name,
            log_directory=spec.log_directory,
            port_mappings=[
                pb.PortMapping(protocol=pb.Protocol.Value(m.protocol.upper()),
                               container_port=m.container_port, host_port=m.host_port,
                               host_ip=m.host_ip)
                for m in spec.port_mappings],
            labels=spec.labels,
            annotations=spec.annotations,
            linux=pb.LinuxPodSandboxConfig(
                security_context=pb.LinuxSandboxSecurityContext(
                    namespace_options=pb.NamespaceOption(network=pb.POD, pid=pb.CONTAINER,
                                                         ipc=pb.POD))),
        )

    def run_pod(self, spec: PodSpec) -> str:
        """RunPodSandbox; returns the sandbox id."""
        reply = self._call("RunPodSandbox",
                           self.pb.RunPodSandboxRequest(config=self.sandbox_config(spec)))
        return reply.pod_sandbox_id

    def pod_status(self, pod_id: str, verbose: bool = False):
        """PodSandboxStatus: (status message, info dict with JSON values decoded)."""
        reply = self._call("PodSandboxStatus",
                           self.pb.PodSandboxStatusRequest(pod_sandbox_id=pod_id,
                                                           verbose=verbose))
        info = {}
        for key, value in reply.info.items():
            try:
                info[key] = json.loads(value)
            except ValueError:
                info[key] = value
        return reply.status, info

    def pod_ip(self, pod_id: str) -> str:
        status, _ = self.pod_status(pod_id)
        return status.network.ip

    def list_pods(self):
        return list(self._call("ListPodSandbox", self.pb.ListPodSandboxRequest()).items)

    def stop_pod(self, pod_id: str) -> None:
        self._call("StopPodSandbox", self.pb.StopPodSandboxRequest(pod_sandbox_id=pod_id))

    def remove_pod(self, pod_id: str) -> None:
        self._call("RemovePodSandbox", self.pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id))

    # -- containers --------------------------------------------------------------------

    def create_container(self, pod_id: str, spec: PodSpec, name: str, image: str,
                         command: list[str], args: list[str] = (),
                         env: dict[str, str] | None = None) -> str:
        pb = self.pb
        config = pb.ContainerConfig(
            metadata=pb.ContainerMetadata(name=name, attempt=0),
            image=pb.ImageSpec(image=image),
            command=list(command), args=list(args),
            envs=[pb.KeyValue(key=k, value=v) for k, v in (env or {}).items()],
            log_path=f"{name}.log" if spec.log_directory else "",
        )
        reply = self._call("CreateContainer", pb.CreateContainerRequest(
            pod_sandbox_id=pod_id, config=config, sandbox_config=self.sandbox_config(spec)))
        return reply.container_id

    def start_container(self, container_id: str) -> None:
        self._call("StartContainer", self.pb.StartContainerRequest(container_id=container_id))

    def container_state(self, container_id: str) -> str:
        reply = self._call("ContainerStatus",
                           self.pb.ContainerStatusRequest(container_id=container_id))
        return self.pb.ContainerState.Name(reply.status.state)

    def exec_sync(self, container_id: str, cmd: list[str], timeout_s: int = 30):
        """ExecSync: (exit code, stdout bytes, stderr bytes)."""
        reply = self._call("ExecSync", self.pb.ExecSyncRequest(
            container_id=container_id, cmd=list(cmd), timeout=timeout_s),
            timeout_s=timeout_s + 10)
        return reply.exit_code, reply.stdout, reply.stderr

    def stop_container(self, container_id: str, timeout_s: int = 0) -> None:
        self._call("StopContainer", self.pb.StopContainerRequest(
            container_id=container_id, timeout=timeout_s))

    def remove_container(self, container_id: str) -> None:
        self._call("RemoveContainer", self.pb.RemoveContainerRequest(container_id=container_id))
