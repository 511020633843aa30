"""Checks a Prometheus text exposition (format 0.0.4) written by sb_stats_prometheus().

    python3 prom_check.py FILE [METRIC{LABELS}=VALUE ...]

Every line must be a HELP or TYPE comment or a sample of a metric whose TYPE came
before (counter or gauge), named switchboard_*, with well-formed labels and value; each
METRIC{LABELS}=VALUE given must be a sample of the text. Exits non-zero with the reason.
"""
import re
import sys

NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*"'
VALUE = r"-?[0-9]+(?:\.[0-9]+)?(?:e[+-]?[0-9]+)?|NaN|[+-]Inf"
SAMPLE = re.compile(
    r"^(" + NAME + r")(\{(?:" + LABEL + r"(?:," + LABEL + r")*)?\})? (" + VALUE + r")$"
)
META = re.compile(r"^# (HELP|TYPE) (" + NAME + r") (.*)$")


def main():
    text = open(sys.argv[1], encoding="utf-8").read()
    assert text.endswith("\n"), "the text does not end with a newline"
    typed = {}
    samples = {}
    for line in text.split("\n")[:-1]:
        m = META.match(line)
        if m:
            if m.group(1) == "TYPE":
                assert m.group(3) in ("counter", "gauge"), line
                assert m.group(2) not in typed, "TYPE twice: " + line
                typed[m.group(2)] = m.group(3)
            continue
        m = SAMPLE.match(line)
        assert m, "not a valid line: " + repr(line)
        name = m.group(1)
        assert name.startswith("switchboard_"), line
        assert name in typed, "sample before its TYPE: " + line
        if typed[name] == "counter":
            assert name.endswith("_total") and float(m.group(3)) >= 0, line
        key = name + (m.group(2) or "")
        assert key not in samples, "sample twice: " + line
        samples[key] = m.group(3)
    for want in sys.argv[2:]:
        key, value = want.rsplit("=", 1)
        assert samples.get(key) == value, "%s: want %s, got %s" % (key, value, samples.get(key))


if __name__ == "__main__":
    try:
        main()
    except AssertionError as e:
        print("prom_check: " + str(e), file=sys.stderr)
        sys.exit(1)
