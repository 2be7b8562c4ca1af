"""Shared by the token-sampling path tests: force ``TokenSampler``'s host or device path on CPU
and watch it (calls that took the host path, every ``token_rows`` result before the writer's
filter)."""
from __future__ import annotations

from probes import sampling, window


def patch_paths(mp, host: bool) -> tuple[list, list]:
    """With ``mp`` (a ``pytest.MonkeyPatch`` or its ``context()``): the host path on (``host``)
    or off (as on CUDA: ``_host`` None, the device path); returns ``(host_calls, sampled)``,
    lists the patched code appends to (one item per host-path call; each ``token_rows`` result)."""
    draw, orig_host, orig_rows = sampling.TokenSampler._draw_on, sampling.TokenSampler._sample_host, window.token_rows
    host_calls, sampled = [], []

    def draw_on(self, device):
        draw(self, device)
        if not host:
            self._host = None   # as on CUDA: the device path

    def sample_host(self, *a):
        host_calls.append(1)
        return orig_host(self, *a)

    def token_rows(ready):
        out = orig_rows(ready)
        if out is not None:
            sampled.append(out)
        return out

    mp.setattr(sampling.TokenSampler, "_draw_on", draw_on)
    mp.setattr(sampling.TokenSampler, "_sample_host", sample_host)
    mp.setattr(window, "token_rows", token_rows)
    return host_calls, sampled
