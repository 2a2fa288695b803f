"""The conditions a latency was measured under, and whether two of them compare.

A latency measured on a shared machine depends on more than the model: the CPU and
the vector instructions it has (AVX-512 and AMX change ONNX Runtime's kernels), its
clock, and what else runs. :func:`measure_conditions` records them:

* ``cpu``, ``flags`` (the kernel-relevant ones of :data:`KERNEL_FLAGS`), ``cores``,
  ``mhz`` and ``governor`` where the system shows them;
* ``load_1min``: the 1-minute load average (what ``uptime`` shows; it lags by a minute
  and counts the measuring process itself once it has run a while);
* ``others_running``: the mean number of *other* threads running or waiting to run,
  sampled (``/proc/loadavg`` minus this process's running threads) while the probe
  runs: a neighbor spinning on one core counts 1.0, at once;
* ``probe_ms``: the median time of a fixed small network (:func:`profilers.base.probe_specs`)
  timed with the table's backend, threads and clock: the machine's speed, measured.

``hwslim profile`` records them at the start and at the end of a table
(``meta["conditions"]``) and notes a change between the two; ``hwslim verify``,
``hwslim export --verify`` and ``hwslim demo`` measure them again before measuring a
model and :func:`compare_to_table`: when the probe differs by more than
:data:`PROBE_TOLERANCE`, the share of the cores busy with other threads by
:data:`OTHERS_SHARE` (for older tables, which record only the load average:
:data:`LOAD_SHARE`), or the CPU differs, the verdict is unreliable, and one line says
why, naming the one difference that decided and its numbers::

    the speed probe before measuring ran 1.31x slower than when the table was measured (1.31 vs 1 ms): verdict unreliable

For a table with a reference level (format 3) the comparison is ``corrected``: the
measurement is brought to the table's level by a reference timed beside it, so the probe,
the other threads, the load and the governor are reported but decide nothing; what
decides is another CPU, or the reference itself (:func:`reference_reasons`:
:data:`MAX_LEVEL_CHANGE`, :data:`REFERENCE_DISAGREEMENT`).

The tolerances are measured on the 2-core development machine (AMD EPYC, KVM; see
``latency_tables/README.md``): repeated probes there agree within 0.5%, and a neighbor
process spinning on the other core moved the probe (thread CPU time) by 0-4%.
"""
from __future__ import annotations

import datetime as _dt
import math
import os
import statistics
from dataclasses import asdict, dataclass, replace
from typing import Any, Mapping, Sequence

from hwslim.core.machine import (KERNEL_FLAGS, cpu_flags, cpu_governor, cpu_mhz, cpu_model, load_1min,  # noqa: F401
                                 others_running)

# the probe may differ by this much (relative) before a verdict is called unreliable: 10x the
# spread of repeated probes on a quiet machine, above what a neighbor on another core did to
# the thread-CPU-time clock on the development machine (0-4%)
PROBE_TOLERANCE = 0.05
# the share of the cores busy with other threads (sampled during the probe, capped at all of
# them) may differ by this much: on 2 cores, 0.8 threads; a neighbor spinning on one core is 1.0
OTHERS_SHARE = 0.4
# the same for the 1-minute load average, where a table records nothing else (older tables)
LOAD_SHARE = 0.5
# A table with a reference level (hwslim.latency.table.LatencyTable.reference_level_ms) and a check
# timed beside the reference compare at the table's level: the machine's speed level is corrected,
# not a reason to doubt. Except where the correction itself is not trustworthy:
# - the reference's level moved by more than this factor: the largest moves seen on shared VMs
#   were 1.2-1.7x (issue 34); beyond 2x the machine is not the one the table measured slowed
#   down (another host, thermal or power limits), and kernels need not slow alike;
MAX_LEVEL_CHANGE = 2.0
# - the two references (dense conv, depthwise block) moved unevenly: their ratios (now / the
#   table's) differ by more than this share. Times are corrected by the references' sum (dense
#   share 0.5), so a model whose dense share is w is off by about |w - 0.5| x the gap: at this
#   line at most 8% for w from 0.1 to 0.9, where uncorrected it is off by the whole level
#   change. Neighbors do move the two apart: on the shared 2-core AMD EPYC VM (load 4.6-5.7),
#   the dense / dwpw ratio of quarter-second reference levels ranged over 31% within 40 s.
#   Beyond this line a model's time is brought to the table's level by each reference alone as
#   well: the model follows neither exactly, but lies between them, so a verdict both give is
#   still confident (hwslim.latency.verify.VerifyResult.judged_range); only one they split is not.
REFERENCE_DISAGREEMENT = 0.20
# what follows from references that moved apart, ending :func:`uneven_reason`'s sentence
UNEVEN_CONSEQUENCE = ", so the correction to the table's level is not trustworthy"














@dataclass(frozen=True)
class Conditions:
    """What a measurement ran under (see the module docstring); None: not known."""

    cpu: str | None = None
    flags: tuple[str, ...] | None = None
    cores: int | None = None
    mhz: float | None = None
    governor: str | None = None
    load_1min: float | None = None
    others_running: float | None = None
    probe_ms: float | None = None
    probe_iqr_ms: float | None = None
    probe_n: int | None = None
    at: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["flags"] = None if self.flags is None else list(self.flags)
        return d

    @classmethod
    def from_dict(cls, d: Any) -> "Conditions | None":
        """Read recorded conditions; a value that is not what it should be reads as unknown."""
        if not isinstance(d, Mapping):
            return None

        def number(key: str, positive: bool = False) -> float | None:
            v = d.get(key)
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
            return float(v) if ok and (v > 0 or not positive) else None

        def text(key: str) -> str | None:
            v = d.get(key)
            return v if isinstance(v, str) and v else None

        flags = d.get("flags")
        flags = tuple(flags) if isinstance(flags, list) and all(isinstance(f, str) for f in flags) else None
        cores = number("cores", positive=True)
        n = number("probe_n", positive=True)
        return cls(cpu=text("cpu"), flags=flags, cores=int(cores) if cores else None, mhz=number("mhz", True),
                   governor=text("governor"), load_1min=number("load_1min"),
                   others_running=number("others_running"), probe_ms=number("probe_ms", positive=True),
                   probe_iqr_ms=number("probe_iqr_ms"), probe_n=int(n) if n else None, at=text("at") or "")

    def describe(self) -> str:
        """One line for logs: ``AMD EPYC (avx2, avx512f), probe 0.255 ms, load 0.9``."""
        parts = [f"{self.cpu or '?'}" + (f" ({', '.join(self.flags)})" if self.flags else "")]
        if self.probe_ms is not None:
            parts.append(f"probe {self.probe_ms:.3g} ms")
        if self.others_running is not None:
            parts.append(f"{self.others_running:.1f} other running threads")
        if self.load_1min is not None:
            parts.append(f"load {self.load_1min:.1f}")
        return ", ".join(parts)


def machine_conditions() -> Conditions:
    """This machine's conditions now, without a probe (no backend needed)."""
    return Conditions(cpu=cpu_model(), flags=cpu_flags(), cores=os.cpu_count(), mhz=cpu_mhz(),
                      governor=cpu_governor(), load_1min=load_1min(), others_running=_mean_others(4),
                      at=_now())


def measure_conditions(profiler=None) -> Conditions:
    """This machine's conditions now, with the probe timed by ``profiler`` (its backend,
    threads and clock; a quarter of a second) and the other running threads sampled
    meanwhile. Without a profiler, or where its backend has no probe: as
    :func:`machine_conditions`."""
    base = machine_conditions()
    if profiler is None:
        return base
    seen: list[int] = []

    def count() -> None:
        n = others_running()
        if n is not None:
            seen.append(n)

    t = profiler.probe(between=count)
    if t is None:
        return base
    others = round(statistics.mean(seen), 2) if seen else base.others_running
    return replace(base, others_running=others, probe_ms=round(t.median_ms, 6), probe_iqr_ms=round(t.iqr_ms, 6),
                   probe_n=t.n, load_1min=load_1min())


def _mean_others(n: int) -> float | None:
    seen = [x for x in (others_running() for _ in range(n)) if x is not None]
    return round(statistics.mean(seen), 2) if seen else None


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# -- comparing --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ConditionCheck:
    """The comparison of the conditions now with a reference's (a table's, or a profile's start).

    ``reasons`` is empty when they compare; otherwise it lists every difference found, each a
    plain sentence, the one that decides first (:attr:`summary`): another CPU, a table measured
    while its machine changed, the frequency governor, the speed probe, the other running
    threads, the load average. ``details`` (probe ratio, threads, load) are reported either way.
    """

    reasons: tuple[str, ...]
    details: tuple[str, ...]
    probe_ratio: float | None = None  # now / reference
    load_now: float | None = None
    load_then: float | None = None
    others_now: float | None = None
    others_then: float | None = None
    now: Conditions | None = None  # the conditions compared
    level_ratio: float | None = None  # the reference's time now / at the table's level (corrected checks)
    # each reference's time now / at the table's level, by name (corrected checks)
    reference_ratios: tuple[tuple[str, float], ...] = ()
    uneven: str | None = None  # the reason, among ``reasons``, saying the references moved unevenly

    @property
    def uneven_move(self) -> str | None:
        """:attr:`uneven` without its consequence: how the references moved apart (for a verdict
        that stands anyway, :func:`hwslim.latency.verify.bracketed`)."""
        return None if self.uneven is None else self.uneven.removesuffix(UNEVEN_CONSEQUENCE)

    @property
    def only_uneven(self) -> bool:
        """The one thing against the conditions is that the references moved unevenly: a verdict
        that holds by each reference alone is still confident (``hwslim.latency.verify``)."""
        return self.uneven is not None and all(r == self.uneven for r in self.reasons)

    @property
    def reliable(self) -> bool:
        return not self.reasons

    @property
    def summary(self) -> str:
        """The one difference that decided: ``the speed probe ran 1.31x slower than when the table
        was measured (1.31 vs 1.00 ms)``; empty when the conditions compare."""
        return self.reasons[0] if self.reasons else ""

    def line(self, consequence: str = "verdict unreliable") -> str:
        """:attr:`summary` and what follows from it: ``...: verdict unreliable``."""
        return f"{self.summary}: {consequence}"

    def as_dict(self) -> dict[str, Any]:
        return {"reliable": self.reliable, "reasons": list(self.reasons), "decided_by": self.summary or None,
                "probe_ratio": self.probe_ratio, "level_ratio": self.level_ratio,
                "reference_ratios": dict(self.reference_ratios) or None, "only_uneven": self.only_uneven,
                "load_now": self.load_now, "load_then": self.load_then, "others_running_now": self.others_now,
                "others_running_then": self.others_then, "probe_ms_now": self.now.probe_ms if self.now else None,
                "note": None if self.reliable else self.line()}


def _machine_reasons(then: Conditions, now: Conditions, same_cpu: bool) -> list[str]:
    """Another CPU or other kernel flags, as one sentence."""
    if same_cpu and then.cpu and now.cpu and then.cpu != now.cpu:
        return [f"the table was measured on {then.cpu}, this machine is {now.cpu}"]
    if same_cpu and then.flags is not None and now.flags is not None and set(then.flags) != set(now.flags):
        gone, new = sorted(set(then.flags) - set(now.flags)), sorted(set(now.flags) - set(then.flags))
        parts = ([f"missing here {', '.join(gone)}"] if gone else []) + ([f"new here {', '.join(new)}"] if new else [])
        return ["this CPU's kernel flags differ from the table's: " + "; ".join(parts)]
    return []


def compare(then: Conditions | None, now: Conditions, *, than: str = "when the table was measured",
            when: str = "", same_cpu: bool = True, also: Sequence[str] = (), corrected: bool = False) -> ConditionCheck:
    """Do the conditions ``now`` compare with ``then``? (``also``: further reasons not to trust.)

    Unreliable when the CPU or its kernel flags or governor differ (``same_cpu``), the
    probe is slower or faster by more than :data:`PROBE_TOLERANCE`, or the share of the
    cores busy with other threads (each count capped at the core count: beyond it every
    core is shared either way) differs by :data:`OTHERS_SHARE` or more (where either
    side lacks the count: the 1-minute load, by :data:`LOAD_SHARE`). ``corrected``: the
    measurement is brought to the table's reference level, so the machine's speed (governor,
    probe, other threads, load) is reported in ``details`` but is no reason. ``when`` says when
    ``now`` was taken (``"before measuring"``): each reason is one sentence naming that
    probe and its numbers, never a direction the numbers do not show.
    """
    then = then or Conditions()
    at = f" {when}" if when else ""
    reasons = _machine_reasons(then, now, same_cpu) + list(also)
    speed: list[str] = []  # reasons that a correction to the table's reference level removes
    if then.governor and now.governor and then.governor != now.governor:
        speed.append(f"the CPU frequency governor is {now.governor}, it was {then.governor} {than}")
    details: list[str] = []
    ratio = None
    if then.probe_ms and now.probe_ms:
        ratio = now.probe_ms / then.probe_ms
        details.append(f"probe {ratio:.2f}x slower" if ratio >= 1 else f"probe {1 / ratio:.2f}x faster")
        if ratio > 1 + PROBE_TOLERANCE or ratio < 1 / (1 + PROBE_TOLERANCE):
            how = f"{ratio:.2f}x slower" if ratio >= 1 else f"{1 / ratio:.2f}x faster"
            speed.append(f"the speed probe{at} ran {how} than {than} "
                         f"({now.probe_ms:.3g} vs {then.probe_ms:.3g} ms)")
    cores = now.cores or then.cores or os.cpu_count() or 1

    def share_change(a: float, b: float) -> float:  # busy share of the cores, now minus then
        return (min(a, cores) - min(b, cores)) / cores

    if then.others_running is not None and now.others_running is not None:
        details.append(f"{now.others_running:.1f} vs {then.others_running:.1f} other running threads")
        if abs(share_change(now.others_running, then.others_running)) >= OTHERS_SHARE - 1e-9:
            speed.append(f"{now.others_running:.1f} other threads were running{at} against "
                         f"{then.others_running:.1f} {than}, on {cores} cores")
        if now.load_1min is not None and then.load_1min is not None:
            details.append(f"load {now.load_1min:.1f} vs {then.load_1min:.1f}")
    elif then.load_1min is not None and now.load_1min is not None:
        details.append(f"load {now.load_1min:.1f} vs {then.load_1min:.1f}")
        if abs(share_change(now.load_1min, then.load_1min)) >= LOAD_SHARE - 1e-9:
            speed.append(f"the load average was {now.load_1min:.1f}{at} against {then.load_1min:.1f} {than}, "
                         f"on {cores} cores")
    if not corrected:
        reasons += speed
    return ConditionCheck(tuple(reasons), tuple(details), ratio, now.load_1min, then.load_1min,
                          now.others_running, then.others_running, now)


def _mean(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return round(statistics.mean(vals), 6) if vals else None


def table_conditions(meta: Mapping[str, Any]) -> tuple[Conditions | None, str | None]:
    """What a table was measured under (start and end merged: mean numbers) and the note
    ``hwslim profile`` left when they changed while it measured (else None).

    Tables from before conditions were recorded give what they have: the CPU (for CPU
    tables) and the 1-minute load at start and end.
    """
    rec = meta.get("conditions")
    if isinstance(rec, Mapping):
        parts = [c for c in (Conditions.from_dict(rec.get("start")), Conditions.from_dict(rec.get("end")))
                 if c is not None]
        changed = rec.get("changed") if isinstance(rec.get("changed"), str) else None
        if parts:
            first = parts[0]
            merged = Conditions(cpu=first.cpu, flags=first.flags, cores=first.cores, mhz=_mean([c.mhz for c in parts]),
                                governor=first.governor, load_1min=_mean([c.load_1min for c in parts]),
                                others_running=_mean([c.others_running for c in parts]),
                                probe_ms=_mean([c.probe_ms for c in parts]),
                                probe_iqr_ms=_mean([c.probe_iqr_ms for c in parts]), at=first.at)
            return merged, changed
    loads = meta.get("load_avg_1min")
    load = None
    if isinstance(loads, list):
        load = _mean([float(v) for v in loads if isinstance(v, (int, float)) and not isinstance(v, bool)
                      and math.isfinite(v) and v >= 0])
    cpu = meta.get("device_name") if meta.get("device") == "cpu" and isinstance(meta.get("device_name"), str) else None
    if cpu is None and load is None:
        return None, None
    return Conditions(cpu=cpu, load_1min=load), None


def compare_to_table(meta: Mapping[str, Any], now: Conditions, when: str = "",
                     reference_now: Mapping[str, float] | None = None) -> ConditionCheck:
    """:func:`compare` the conditions now with a table's (its metadata), including the change
    ``hwslim profile`` noted while measuring it; ``when``: when ``now`` was taken (``"before measuring"``).

    A table with a reference level (``meta["reference"]``) is compared ``corrected``: its times
    were brought to its level as they were measured, and a measurement compared with it is too,
    so a change of the machine's speed is no reason; ``reference_now`` (the reference's parts
    timed beside the measurement, ms by name) adds the reasons the correction cannot be trusted
    (:func:`reference_reasons`)."""
    then, changed = table_conditions(meta)
    ref = meta.get("reference")
    corrected = isinstance(ref, Mapping)
    also = [f"the table's machine changed while it was measured: {changed}"] if changed and not corrected else []
    level_ratio, ratios = None, {}
    if corrected and reference_now:
        level_ratio, more = reference_reasons(ref, reference_now)
        ratios = reference_ratios(ref, reference_now)
        also += more
    return replace(compare(then, now, when=when, also=also, corrected=corrected), level_ratio=level_ratio,
                   reference_ratios=tuple(ratios.items()), uneven=uneven_reason(ratios))


def reference_ratios(table_ref: Mapping[str, Any], now_parts: Mapping[str, float]) -> dict[str, float]:
    """Each reference's time now / at a table's level (``table_ref``: ``meta["reference"]``), by name."""
    then = table_ref.get("parts_ms") if isinstance(table_ref.get("parts_ms"), Mapping) else {}
    return {k: now_parts[k] / float(then[k]) for k in now_parts if k in then and float(then[k]) > 0}


def uneven_reason(ratios: Mapping[str, float]) -> str | None:
    """Why the references' ratios (:func:`reference_ratios`) make the correction by their sum
    untrustworthy: they differ by more than :data:`REFERENCE_DISAGREEMENT`; None where they do not."""
    if len(ratios) < 2:
        return None
    gap = max(ratios.values()) / min(ratios.values()) - 1
    if gap <= REFERENCE_DISAGREEMENT:
        return None
    each = ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items())
    return (f"the references timed beside the model moved unevenly since the table ({each}: {100 * gap:.0f}% apart, "
            f"more than {100 * REFERENCE_DISAGREEMENT:g}%){UNEVEN_CONSEQUENCE}")


def reference_reasons(table_ref: Mapping[str, Any], now_parts: Mapping[str, float]) -> tuple[float, list[str]]:
    """The reference's level now against a table's (now / then) and why correcting by it is not
    trustworthy: a change beyond :data:`MAX_LEVEL_CHANGE`, or references that moved apart by
    more than :data:`REFERENCE_DISAGREEMENT` (:func:`uneven_reason`). ``table_ref``: ``meta["reference"]``."""
    ratio = sum(now_parts.values()) / float(table_ref["level_ms"])
    reasons = []
    if ratio > MAX_LEVEL_CHANGE or ratio < 1 / MAX_LEVEL_CHANGE:
        how = f"{ratio:.2f}x slower" if ratio >= 1 else f"{1 / ratio:.2f}x faster"
        reasons.append(f"the reference timed beside the model ran {how} than at the table's level ({sum(now_parts.values()):.3g} vs "
                       f"{float(table_ref['level_ms']):.3g} ms), beyond the {MAX_LEVEL_CHANGE:g}x a correction "
                       f"to the table's level is trusted for")
    uneven = uneven_reason(reference_ratios(table_ref, now_parts))
    return ratio, reasons + ([uneven] if uneven else [])


def drift(start: Conditions, end: Conditions, what: str = "profiling") -> ConditionCheck:
    """How the conditions changed between the start and the end of one measurement (a profile)."""
    return compare(start, end, than=f"at the start of {what}", when=f"at the end of {what}", same_cpu=False)


def conditions_for_table(table) -> Conditions:
    """The conditions now, the probe timed with ``table``'s own backend and settings."""
    from profilers import profiler_for_table

    with profiler_for_table(table) as prof:
        return measure_conditions(prof)


__all__ = ["KERNEL_FLAGS", "LOAD_SHARE", "MAX_LEVEL_CHANGE", "OTHERS_SHARE", "PROBE_TOLERANCE",
           "REFERENCE_DISAGREEMENT", "UNEVEN_CONSEQUENCE", "reference_ratios", "reference_reasons", "uneven_reason", "ConditionCheck",
           "Conditions",
           "compare", "compare_to_table", "conditions_for_table", "cpu_flags", "cpu_model", "drift",
           "machine_conditions", "measure_conditions", "table_conditions"]
