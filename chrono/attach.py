"""The contract between chrono's trainer callbacks and an attacher (``probes.attach``, or your own).

The core never imports ``probes`` (it sits a layer above, DESIGN §2). An
attacher is a callable with ``probes.attach``'s signature that a package
registers in the standard entry-point group ``chrono.attach``; this
distribution registers ``probes = "probes:attach"`` in pyproject.toml.
An attacher reports a user-facing reason it cannot attach (no router found, a
bad spec...) by raising ``AttachError`` or a subclass (``probes.ProbeError``
is one); the non-strict callbacks turn that into one log line, and let every
other exception through. See docs/architecture.md.
"""
from __future__ import annotations

ATTACH_GROUP = "chrono.attach"   # entry-point group of attachers (probes declares "probes")


class AttachError(Exception):
    """An attacher cannot attach to this model, for a reason the user can act on."""


def find_attacher():
    """The attach callable the ``chrono.attach`` entry point names (``probes:attach`` when installed).

    The entry named ``probes`` wins when several packages declare one.

    Raises:
        ImportError: no installed package declares a ``chrono.attach`` entry point
            (one line saying how to install one).
    """
    from importlib.metadata import entry_points

    eps = {ep.name: ep for ep in entry_points(group=ATTACH_GROUP)}
    if not eps:
        raise ImportError(f"chrono.integrations needs an attacher registered in the {ATTACH_GROUP!r} "
                          "entry-point group, and none is installed: install chrono-moe with its probes "
                          "package (pip install chrono-moe), or pass attach=probes.attach to the callback")
    return (eps.get("probes") or eps[sorted(eps)[0]]).load()
