"""install-cni's and uninstall-cni's options: the one definition, used by the command
lines of cni/install.py (``main``, ``main_uninstall``) and by ``vswitchctl install-cni`` /
``uninstall-cni`` (vswitch/cli.py). Apart from install.py so that vswitchctl, which builds
every subcommand's parser on each run, does not import the installer (hashlib, subprocess,
the plugin build) for its other commands. Standard library only; the defaults are here.
"""
from vswitch.cnitypes import DEFAULT_SOCKET

CONFLIST_NAME = "05-vswitch.conflist"
DEFAULT_SUBNET = "10.88.0.0/16"
DEFAULT_NETWORK = "vswitch"
# PATH of a service started by systemd (containerd, CRI-O, the kubelet): where the runtime
# looks for the plugin's python3 when the installer's own PATH is not the host's
# --form: BIN/vswitch is the C client (BIN/vswitch-py its Python fallback) or the Python plugin
FORMS = ("client", "python")
HOST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def add_install_arguments(parser, socket_dest="socket", socket_default=DEFAULT_SOCKET,
                          socket_help="vswitchd's control socket, written into the network list"):
    """install-cni's options on ``parser``: the one definition, for ``main`` and for
    ``vswitchctl install-cni`` (vswitch/cli.py), which keeps ``--socket`` in its own
    ``socket_dest`` (its default: vswitchctl's ``--socket``) and fills a bare
    ``--use-pod-cidr`` (or none, without ``--subnet``) from the daemon's cluster CIDR."""
    parser.add_argument("--bin-dir", required=True, metavar="DIR", help="the runtime's CNI bin directory")
    parser.add_argument("--conf-dir", required=True, metavar="DIR", help="the runtime's CNI conf directory")
    parser.add_argument("--socket", dest=socket_dest, default=socket_default, metavar="PATH", help=socket_help)
    parser.add_argument("--subnet", metavar="CIDR", action="append",
                        help=f"pod subnet for host-local (default {DEFAULT_SUBNET}); twice, "
                             f"an IPv4 and an IPv6 one, for dual stack")
    parser.add_argument("--name", default=DEFAULT_NETWORK, help="network name")
    parser.add_argument("--use-pod-cidr", metavar="FAMILIES", nargs="?", const="",
                        help="instead of --subnet: host-local on \"usePodCidr\" (the node's subnet leased "
                             "by vswitchd in cluster mode), one range per family: 4, 6 or 4,6; without "
                             "FAMILIES: vswitchctl asks the daemon for its cluster CIDR's families, "
                             "otherwise 4 (vswitchctl's default without --subnet when the daemon runs "
                             "in cluster mode)")
    parser.add_argument("--conflist-name", default=CONFLIST_NAME, metavar="NAME",
                        help=f"the network list's file name (default {CONFLIST_NAME}: before the "
                             f"usual 10-... lists, which runtimes would load instead)")
    parser.add_argument("--host-root", default="/", metavar="DIR",
                        help="where the node's root filesystem is mounted (an init container: "
                             "/host); the host's python3 is looked for there")
    parser.add_argument("--host-path", default=None, metavar="PATH",
                        help=f"the runtime's PATH, searched for python3 (default: this PATH, or "
                             f"{HOST_PATH} with --host-root)")
    parser.add_argument("--python", default=None, metavar="PATH",
                        help="pin the plugin's interpreter (absolute path on the host) instead of "
                             "python3 from the runtime's PATH")
    parser.add_argument("--no-python-check", action="store_true",
                        help="write the plugin even if no suitable python3 is found (another host)")
    parser.add_argument("--launcher", action="store_true",
                        help="developers: a launcher running the plugin from this installation "
                             "with this interpreter, instead of the relocatable file")
    parser.add_argument("--form", choices=FORMS, default=None,
                        help="client: BIN/vswitch is the C client and BIN/vswitch-py the Python "
                             "plugin it falls back to (--python and --launcher apply to that one); "
                             "python: BIN/vswitch is the Python plugin alone (default: client when "
                             "it was built, else python with a warning)")


def add_uninstall_arguments(parser):
    """uninstall-cni's options: the one definition, for ``main_uninstall`` and vswitchctl."""
    parser.add_argument("--bin-dir", required=True, metavar="DIR", help="the bin directory given to install-cni")
    parser.add_argument("--conf-dir", required=True, metavar="DIR", help="the conf directory given to install-cni")
    parser.add_argument("--force", action="store_true", help="also remove files changed since install-cni wrote them")
