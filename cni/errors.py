"""The plugin's error type and its error codes.

Theory of operation: every failure the plugin reports is a :class:`CniError` carrying a CNI
error code, a message a person can act on (naming the offending value) and optional
details. ``plugin.main`` turns it into the error JSON of the requested ``cniVersion`` on
stdout and a non-zero exit. Codes below 100 are the spec's well-known ones; 101-107 are
relayed unchanged from vswitchd (docs/control.md); 110 and up are the plugin's own.
"""

# CNI well-known codes (SPEC.md, "Error" and pkg/types)
INCOMPATIBLE_VERSION = 1
UNSUPPORTED_FIELD = 2
UNKNOWN_CONTAINER = 3
INVALID_ENV = 4
IO_FAILURE = 5
DECODING_FAILURE = 6
INVALID_CONFIG = 7
INVALID_NETNS = 8
TRY_AGAIN_LATER = 11
PLUGIN_NOT_AVAILABLE = 50
LIMITED_CONNECTIVITY = 51

# vswitchd's codes, relayed as they come (docs/control.md)
DAEMON_NETLINK = 101
DAEMON_IF_EXISTS = 102
DAEMON_UNKNOWN_ATTACHMENT = 103
DAEMON_CHECK_FAILED = 104
DAEMON_BAD_REQUEST = 105
DAEMON_UNKNOWN_OP = 106
DAEMON_FAULT = 107

# the plugin's own
IPAM_NOT_FOUND = 110        # ipam.type not found in CNI_PATH
IPAM_FAILED = 111           # the IPAM plugin could not be run, or printed no JSON
IPAM_BAD_RESULT = 112       # the IPAM result is unusable (no address, wrong address)
DAEMON_PROTOCOL = 113       # vswitchd answered something that is not a reply
GC_INCOMPLETE = 114         # GC went through everything but some removals failed
INTERNAL = 115              # a bug in the plugin: the message has the exception
INJECTED_FAULT = 116        # VSWITCH_CNI_TEST_FAULT named a plugin-side step


class CniError(Exception):
    """A CNI error: ``code``, ``msg`` and ``details`` as printed in the error JSON."""

    def __init__(self, code: int, msg: str, details: str = ""):
        super().__init__(msg)
        self.code = int(code)
        self.msg = msg
        self.details = details

    def __repr__(self):
        return f"CniError({self.code}, {self.msg!r}, {self.details!r})"
