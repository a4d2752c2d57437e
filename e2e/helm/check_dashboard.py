#!/usr/bin/env python3
"""Checks the Grafana dashboards the chart ships (charts/parley/dashboards/*.json) against the code (run by
e2e/helm/test.sh; Python 3 standard library only).

Usage:
    check_dashboard.py --root REPO [--dashboards DIR] [--scrape FILE...]

For each dashboard: valid JSON, Grafana's schema basics (schemaVersion, unique panel ids, grid positions), a
`datasource` variable of type prometheus that every panel and query uses, every `$variable` defined, and EVERY
metric name of every PromQL expression (panel queries and variable queries) exposed by the code.

The exposed names come from a static scan of the workspace's Rust sources (tests excluded), with the rules of
prometheus-client 0.24 as parley_telemetry uses it:
    - a registry's prefix is joined to the name with "_" (`Registry::with_prefix("parley_router")` +
      "messages" -> `parley_router_messages`), and so is each `sub_registry_with_prefix` level;
    - `register_with_unit` appends `_<unit>`;
    - a counter (Counter, Family<_, Counter>, AtomicCounters' `.counter(` and `.read(.., Kind::Counter, ..)`) is
      exposed as `<name>_total`; a gauge as `<name>`; a histogram as `<name>_bucket`, `<name>_sum`, `<name>_count`.
Registrations found: `.register("name", "help", x)` and `.register_with_unit(..)` (the kind from x's type in the
same file), `.counter("name", ..)`, `.read("name", .., Kind::X, ..)`, and `.read(name, .., Kind::X, ..)` inside a
`for (name, ..) in TABLE` loop over a const table of ("name", ..) tuples. A file's prefix is its own
`Registry::with_prefix`, or, for a file that registers into a registry it is handed, the prefixes of the call
sites listed in DELEGATED (each listed call is checked to be in the code, so a renamed prefix fails here).
A registration the scan cannot resolve (no prefix, unknown kind) fails the check instead of being guessed.

--scrape FILE...: also compare the scan with real `/metrics` answers (e.g. `curl -s 127.0.0.1:9090/metrics`
of `parley`, `parley-router`, `parley-operator`): every parley_* sample name in them must be in the scan.

Every check prints "ok - ..." or "FAIL - ...: why"; the last line is "check_dashboard: N passed, M failed" and the
exit status is 1 when any check failed.
"""

import argparse
import glob
import json
import os
import re
import sys

# Files that register metrics into a registry they are handed, and the call sites that hand them one:
# (calling file, the call as it appears there, file whose `Registry::with_prefix` is the root, sub-prefix or None,
# a text the calling file must also hold to tie the call to that root registry).
DELEGATED = {
    "api/src/types.rs": [  # RouterStats::register
        ("router/src/metrics.rs", "stats.register(&mut registry)", "router/src/metrics.rs", None,
         'Registry::with_prefix("parley_router")'),
        ("server/src/lib.rs", 'router.stats().register(registry.sub_registry_with_prefix("router"))',
         "gateway/src/metrics.rs", "router", "Metrics::with(|registry|"),
    ],
    "api/src/pool.rs": [  # PoolStats::register
        ("server/src/lib.rs", 'pool.register(registry.sub_registry_with_prefix("gateway"))',
         "gateway/src/metrics.rs", "gateway", "Metrics::with(|registry|"),
    ],
    "bus/src/redis.rs": [  # register_metrics
        ("router/src/metrics.rs", "parley_bus::redis::register_metrics(&mut self.registry, stats)",
         "router/src/metrics.rs", None, 'Registry::with_prefix("parley_router")'),
        ("server/src/lib.rs",
         'parley_bus::redis::register_metrics(registry.sub_registry_with_prefix("gateway"), redis)',
         "gateway/src/metrics.rs", "gateway", "Metrics::with(|registry|"),
    ],
    "gateway/src/pod_agent.rs": [  # AgentMetrics::register
        ("server/src/lib.rs", 'agent_metrics.register(registry.sub_registry_with_prefix("gateway"))',
         "gateway/src/metrics.rs", "gateway", "Metrics::with(|registry|"),
    ],
    "router/src/push.rs": [  # PushReport::register
        ("router/src/metrics.rs", "report.register(&mut self.registry)", "router/src/metrics.rs", None,
         'Registry::with_prefix("parley_router")'),
        ("server/src/lib.rs", "worker.report().register(registry)", "gateway/src/metrics.rs", None,
         "Metrics::with(|registry|"),
    ],
}

# Files that hold the generic metric machinery (no metric names of their own): register_collector and
# encode_descriptor are allowed there only.
GENERIC_SITES = {
    "telemetry/src/metrics.rs": "AtomicCounters, the collector behind .counter()/.read(); scanned at their call sites",
}

# Known exceptions: {exposed name: kind} the dashboard may use although the scan does not find them in the sources
# (a metric being added in the same change as its panel). While absent from the sources they are accepted and
# reported as such; once the scan finds one, its entry is reported as removable. None at present.
ANNOUNCED = {}

UNITS = {"Amperes", "Bytes", "Celsius", "Grams", "Joules", "Meters", "Ratios", "Seconds", "Volts"}
SKIP_DIRS = {"target", "fuzz", "tests", "benches", "examples", "node_modules"}

# PromQL words that are not metric names.
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
            "offset", "inf", "nan", "atan2", "start", "end"}
LABEL_LIST_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right"}
RATE_FUNCTIONS = {"rate", "irate", "increase"}
GRAFANA_BUILTINS = {"__rate_interval", "__interval", "__interval_ms", "__range", "__range_s", "__range_ms",
                    "__dashboard", "__from", "__to", "__name", "__org", "__user", "__timeFilter"}
NAME = r"[A-Za-z_:][A-Za-z0-9_:]*"


class Checker:
    def __init__(self, quiet=False):
        self.passed = 0
        self.failed = 0
        self.quiet = quiet

    def check(self, name, ok, why=""):
        if ok:
            self.passed += 1
            if not self.quiet:
                print(f"ok - {name}")
        else:
            self.failed += 1
            if not self.quiet:
                print(f"FAIL - {name}: {why}")
        return ok


# ------------------------------------------------------------------------------------------------ Rust sources

def blank_comments_and_strings(text, keep_strings=True):
    """Replaces comments (and, unless keep_strings, string contents) with spaces, keeping offsets."""
    out, i, n = list(text), 0, len(text)

    def blank(start, end):
        for k in range(start, end):
            if out[k] != "\n":
                out[k] = " "

    while i < n:
        c = text[i]
        if text.startswith("//", i):
            end = text.find("\n", i)
            end = n if end < 0 else end
            blank(i, end)
            i = end
        elif text.startswith("/*", i):
            depth, j = 1, i + 2
            while j < n and depth:
                if text.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif text.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            blank(i, j)
            i = j
        elif c == "r" and re.match(r'r#*"', text[i:i + 8]) and (i == 0 or not (text[i - 1].isalnum() or text[i - 1] == "_")):
            hashes = re.match(r'r(#*)"', text[i:]).group(1)
            close = '"' + hashes
            end = text.find(close, i + 2 + len(hashes))
            end = n if end < 0 else end + len(close)
            if not keep_strings:
                blank(i + 1, end - 1)
            i = end
        elif c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            if not keep_strings:
                blank(i + 1, j)
            i = j + 1
        elif c == "'":
            if text.startswith("'\\", i):
                end = text.find("'", i + 2)
                i = n if end < 0 else end + 1
            elif i + 2 < n and text[i + 2] == "'":
                i += 3
            else:
                i += 1  # a lifetime
        else:
            i += 1
    return "".join(out)


def strip_test_items(text):
    """Removes every `#[cfg(test)]` item (a `mod tests { .. }`, a fn, an impl) from comment-free text."""
    code = blank_comments_and_strings(text, keep_strings=False)
    spans = []
    for match in re.finditer(r"#\[cfg\(test\)\]", code):
        j = match.end()
        brace, semi = code.find("{", j), code.find(";", j)
        if brace < 0 or (0 <= semi < brace):
            spans.append((match.start(), semi + 1 if semi >= 0 else len(code)))
            continue
        depth, k = 0, brace
        while k < len(code):
            if code[k] == "{":
                depth += 1
            elif code[k] == "}":
                depth -= 1
                if depth == 0:
                    break
            k += 1
        spans.append((match.start(), k + 1))
    out = text
    for start, end in sorted(spans, reverse=True):
        out = out[:start] + out[end:]
    return out


def source_files(root):
    """Non-test Rust sources of the workspace's crates: <crate>/src/**/*.rs, without tests.rs files and
    tests/benches/examples directories."""
    files = []
    for crate in sorted(os.listdir(root)):
        src = os.path.join(root, crate, "src")
        if crate.startswith(".") or crate in SKIP_DIRS or not os.path.isfile(os.path.join(root, crate, "Cargo.toml")):
            continue
        for directory, dirs, names in os.walk(src):
            dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS)
            for name in sorted(names):
                if name.endswith(".rs") and name != "tests.rs":
                    files.append(os.path.relpath(os.path.join(directory, name), root))
    return files


def collapse(text):
    return re.sub(r"\s+", "", text)


STRING = r'"(?:[^"\\]|\\.)*"'
R_REGISTER = re.compile(rf'\.register\(\s*"({NAME})"\s*,\s*{STRING}\s*,\s*([\w.]+?)(?:\.clone\(\))?\s*,?\s*\)', re.S)
R_REGISTER_UNIT = re.compile(rf'\.register_with_unit\(\s*"({NAME})"\s*,\s*{STRING}\s*,\s*(?:\w+::)*Unit::(\w+)\s*,'
                             rf'\s*([\w.]+?)(?:\.clone\(\))?\s*,?\s*\)', re.S)
R_COUNTER = re.compile(rf'\.counter\(\s*"({NAME})"\s*,\s*{STRING}\s*,', re.S)
R_READ = re.compile(rf'\.read\(\s*"({NAME})"\s*,\s*{STRING}\s*,\s*(?:\w+::)*Kind::(Counter|Gauge)\b', re.S)
R_READ_VARIABLE = re.compile(r'\.(?:read|counter)\(\s*([a-z_]\w*)\s*,\s*[a-z_]\w*\s*,\s*'
                             r'(?:(?:\w+::)*Kind::(Counter|Gauge)\b)?', re.S)
R_ANY_REGISTRATION = re.compile(r'\.(?:register|register_with_unit|counter|read)\(\s*"', re.S)
R_OWN_PREFIX = re.compile(r'Registry::with_prefix\(\s*"([^"]+)"\s*\)')


def metric_kind(code, identifier):
    """The kind of the metric held in `identifier` (a let binding or a field of the same file)."""
    kinds = set()
    for match in re.finditer(rf"\b{re.escape(identifier)}\s*(?::(?!:)|=(?!=))\s*([^\n;]*)", code):
        text = match.group(1)
        if "istogram" in text:
            kinds.add("histogram")
        elif re.search(r"\bGauge\b", text) and not re.search(r"\bCounter\b", text):
            kinds.add("gauge")
        elif re.search(r"\bCounter\b", text) and not re.search(r"\bGauge\b", text):
            kinds.add("counter")
    return kinds.pop() if len(kinds) == 1 else None


def exposed(base, kind):
    if kind == "counter":
        return {f"{base}_total": kind}
    if kind == "histogram":
        return {f"{base}_{suffix}": kind for suffix in ("bucket", "sum", "count")}
    return {base: kind}


def scan_sources(c, root):
    """Returns {exposed name: kind} of every metric the code registers, checking the prefix rules on the way."""
    codes = {}
    for path in source_files(root):
        with open(os.path.join(root, path), encoding="utf-8") as handle:
            codes[path] = blank_comments_and_strings(strip_test_items(handle.read()))
    registrations = {}  # path -> [(name, kind or None, unit or None)]
    problems = []
    for path, code in codes.items():
        found = []
        for match in R_REGISTER.finditer(code):
            identifier = match.group(2).split(".")[-1]
            found.append((match.group(1), metric_kind(code, identifier), None,
                          f"register({match.group(1)!r}, .., {identifier})"))
        for match in R_REGISTER_UNIT.finditer(code):
            identifier = match.group(3).split(".")[-1]
            found.append((match.group(1), metric_kind(code, identifier), match.group(2),
                          f"register_with_unit({match.group(1)!r}, .., {identifier})"))
        for match in R_COUNTER.finditer(code):
            found.append((match.group(1), "counter", None, f"counter({match.group(1)!r})"))
        for match in R_READ.finditer(code):
            found.append((match.group(1), match.group(2).lower(), None, f"read({match.group(1)!r})"))
        for match in R_READ_VARIABLE.finditer(code):
            variable, kind = match.group(1), (match.group(2) or "counter").lower()
            if match.group(0).startswith(".read") and not match.group(2):
                continue  # not an AtomicCounters read (no Kind)
            loop = re.search(rf"for\s*\(\s*{variable}\s*,[^)]*\)\s*in\s*&?(\w+)", code)
            table = loop and re.search(rf"const\s+{loop.group(1)}\b[^=]*=\s*&?\[(.*?)\];", code, re.S)
            if not table:
                problems.append(f"{path}: a metric registered under the variable `{variable}`, not from a const table")
                continue
            for entry in re.finditer(rf'\(\s*"({NAME})"\s*,', table.group(1)):
                found.append((entry.group(1), kind, None, f"{loop.group(1)} entry {entry.group(1)!r}"))
        # In a file that deals with metrics, a `.register("..`-like call that none of the patterns read (another
        # argument shape): refuse to guess.
        metrics_file = "prometheus_client" in code or "AtomicCounters" in code
        literal_calls = len(R_ANY_REGISTRATION.findall(code)) if metrics_file else 0
        matched = sum(len(pattern.findall(code)) for pattern in (R_REGISTER, R_REGISTER_UNIT, R_COUNTER, R_READ))
        if metrics_file and literal_calls != matched:
            problems.append(f"{path}: {literal_calls - matched} registration call(s) with a literal name that the "
                            f"scan cannot read")
        for generic in ("register_collector(", "encode_descriptor("):
            if generic in code and path not in GENERIC_SITES:
                problems.append(f"{path}: uses {generic}..) outside the known generic sites {sorted(GENERIC_SITES)}")
        if found:
            registrations[path] = found
    c.check("source scan: every registration call is read", not problems, "; ".join(problems))

    def own_prefix(path):
        prefixes = R_OWN_PREFIX.findall(codes.get(path, ""))
        return prefixes[0] if len(prefixes) == 1 else None

    names, unresolved = {}, []
    for path, found in sorted(registrations.items()):
        prefixes = []
        own = own_prefix(path)
        if own and path in DELEGATED:
            unresolved.append(f"{path}: has its own Registry::with_prefix and a DELEGATED entry")
        elif own:
            if "sub_registry_with_prefix(" in codes[path]:
                unresolved.append(f"{path}: registers under its own prefix and uses sub_registry_with_prefix (ambiguous)")
            prefixes.append(own)
        elif path in DELEGATED:
            for caller, call, root_file, sub, context in DELEGATED[path]:
                caller_code = collapse(codes.get(caller, ""))
                root = own_prefix(root_file)
                ok = collapse(call) in caller_code and collapse(context) in caller_code and root
                if sub:
                    ok = ok and collapse(f'sub_registry_with_prefix("{sub}")') in collapse(call)
                if c.check(f"prefix rule: {path} registered by {caller} under {root}{'_' + sub if sub else ''}_",
                           ok, f"`{call}` or `{context}` not found in {caller}, or no single Registry::with_prefix "
                           f"in {root_file}: update DELEGATED in {os.path.basename(__file__)}"):
                    prefixes.append(f"{root}_{sub}" if sub else root)
        else:
            unresolved.append(f"{path}: registers {[f[0] for f in found]} but has no Registry::with_prefix and no "
                              f"DELEGATED entry")
        for name, kind, unit, what in found:
            if kind is None:
                unresolved.append(f"{path}: {what}: kind (counter, gauge, histogram) not found")
                continue
            if unit is not None and unit not in UNITS:
                unresolved.append(f"{path}: {what}: unit {unit} unknown")
                continue
            for prefix in prefixes:
                base = f"{prefix}_{name}" + (f"_{unit.lower()}" if unit else "")
                for exposed_name, exposed_kind in exposed(base, kind).items():
                    if names.get(exposed_name, exposed_kind) != exposed_kind:
                        unresolved.append(f"{exposed_name}: registered as {names[exposed_name]} and {exposed_kind}")
                    names[exposed_name] = exposed_kind
    c.check("source scan: every registration has a prefix and a kind", not unresolved, "; ".join(unresolved))
    c.check(f"source scan: {len(names)} exposed names, gateway, router and operator metrics among them",
            all(any(n.startswith(p) for n in names) for p in ("parley_gateway_", "parley_router_", "parley_operator_")),
            f"found only {sorted({n.split('_')[1] for n in names})}")
    return names


# ------------------------------------------------------------------------------------------------ PromQL

def tokens(expr):
    """PromQL tokens: (kind, text) with kind in string, name, number, var, punct, range."""
    i, n = 0, len(expr)
    while i < n:
        c = expr[i]
        if c.isspace():
            i += 1
        elif c in "\"'`":
            j = i + 1
            while j < n and expr[j] != c:
                j += 2 if expr[j] == "\\" and c != "`" else 1
            yield "string", expr[i + 1:j]
            i = j + 1
        elif c == "[":
            j = expr.find("]", i)
            j = n if j < 0 else j
            yield "range", expr[i:j + 1]
            i = j + 1
        elif c == "$":
            match = re.match(r"\$(?:\{([A-Za-z_]\w*)(?::\w+)?\}|([A-Za-z_]\w*))", expr[i:])
            if not match:
                yield "punct", c
                i += 1
                continue
            yield "var", match.group(1) or match.group(2)
            i += match.end()
        elif c.isdigit() or (c == "." and i + 1 < n and expr[i + 1].isdigit()):
            match = re.match(r"[0-9.]+(?:[eE][+-]?[0-9]+)?[A-Za-z0-9]*", expr[i:])
            yield "number", match.group(0)
            i += match.end()
        elif re.match(r"[A-Za-z_:]", c):
            match = re.match(NAME, expr[i:])
            yield "name", match.group(0)
            i += match.end()
        else:
            two = expr[i:i + 2]
            if two in ("=~", "!~", "!=", "==", ">=", "<="):
                yield "punct", two
                i += 2
            else:
                yield "punct", c
                i += 1


def promql_metrics(expr):
    """Returns ([(metric name, enclosing function names)], variables used, problems) of one PromQL expression."""
    toks = list(tokens(expr))
    found, variables, problems = [], set(), []
    stack = []  # one entry per open "(": the function name, or None
    braces = 0
    i = 0
    while i < len(toks):
        kind, text = toks[i]
        following = toks[i + 1] if i + 1 < len(toks) else (None, None)
        if kind == "var":
            variables.add(text)
        elif braces:
            if kind == "punct" and text == "}":
                braces -= 1
            elif kind == "name" and text == "__name__" and following[0] == "punct" and i + 2 < len(toks):
                operator, value = following[1], toks[i + 2]
                if value[0] != "string" or operator not in ("=", "=~"):
                    problems.append(f"__name__ {operator} {value[1]!r}: only = \"name\" or =~ \"a|b\" can be checked")
                else:
                    for alternative in value[1].split("|") if operator == "=~" else [value[1]]:
                        if not re.fullmatch(NAME, alternative):
                            problems.append(f"__name__ matcher {value[1]!r}: give literal names (a|b), not a pattern")
                        else:
                            found.append((alternative, [f for f in stack if f]))
                i += 2
            elif kind == "string":
                variables.update(re.findall(r"\$\{?([A-Za-z_]\w*)", text))
        elif kind == "punct" and text == "{":
            braces += 1
        elif kind == "punct" and text == "(":
            stack.append(None)
        elif kind == "punct" and text == ")":
            if stack:
                stack.pop()
        elif kind == "name":
            if text in LABEL_LIST_KEYWORDS and following == ("punct", "("):
                depth, j = 0, i + 1
                while j < len(toks):  # skip the label list
                    if toks[j] == ("punct", "("):
                        depth += 1
                    elif toks[j] == ("punct", ")"):
                        depth -= 1
                        if depth == 0:
                            break
                    j += 1
                i = j
            elif following == ("punct", "("):
                stack.append(text)
                i += 1
            elif following[0] == "name" and following[1] in ("by", "without"):
                pending = text  # `sum by (le) (...)`: the aggregation's "(" comes after the label list
                depth, j = 0, i + 2
                while j < len(toks):
                    if toks[j] == ("punct", "("):
                        depth += 1
                    elif toks[j] == ("punct", ")"):
                        depth -= 1
                        if depth == 0:
                            break
                    j += 1
                if j + 1 < len(toks) and toks[j + 1] == ("punct", "("):
                    stack.append(pending)
                    i = j + 1
                else:
                    problems.append(f"{text} {following[1]} (...) is not followed by its argument")
                    i = j
            elif text not in KEYWORDS:
                found.append((text, [f for f in stack if f]))
        i += 1
    return found, variables, problems


def variable_query(query):
    """The PromQL of a Grafana Prometheus variable query (label_values(selector, label), query_result(expr), or an
    expression), and the label label_values reads."""
    if isinstance(query, dict):
        query = query.get("query", "")
    query = (query or "").strip()
    match = re.fullmatch(r"label_values\((?:(.+),)?\s*([A-Za-z_]\w*)\s*\)", query, re.S)
    if match:
        return (match.group(1) or "").strip(), match.group(2)
    match = re.fullmatch(r"query_result\((.+)\)", query, re.S)
    if match:
        return match.group(1), None
    return query, None


def all_panels(panels):
    for panel in panels or []:
        yield panel
        yield from all_panels(panel.get("panels"))


def check_dashboard(c, path, names, label=None):
    label = label or os.path.basename(path)
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
        dashboard = json.loads(raw.decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        c.check(f"{label}: valid JSON", False, str(error))
        return
    c.check(f"{label}: valid JSON", isinstance(dashboard, dict), "not a JSON object")
    check_dashboard_object(c, label, dashboard, names)


def check_dashboard_object(c, label, dashboard, names):
    """The structural and metric-name checks of one dashboard; returns the unknown metric names it found."""
    schema = dashboard.get("schemaVersion")
    c.check(f"{label}: schemaVersion is 36 or newer (Grafana 9+)", isinstance(schema, int) and schema >= 36,
            f"schemaVersion {schema!r}")
    c.check(f"{label}: has a uid and a title", bool(dashboard.get("uid")) and bool(dashboard.get("title")),
            f"uid {dashboard.get('uid')!r}, title {dashboard.get('title')!r}")
    c.check(f"{label}: id is null (provisioned dashboards get theirs from Grafana)", dashboard.get("id") is None,
            f"id {dashboard.get('id')!r}")
    panels = list(all_panels(dashboard.get("panels")))
    ids = [p.get("id") for p in panels]
    duplicates = sorted({i for i in ids if ids.count(i) > 1}, key=str)
    c.check(f"{label}: {len(panels)} panels with unique integer ids",
            panels and all(isinstance(i, int) for i in ids) and not duplicates,
            f"duplicate ids {duplicates}, missing or not integers: "
            f"{[p.get('title') for p in panels if not isinstance(p.get('id'), int)]}")
    bad_grid = [p.get("title") for p in panels
                if not all(isinstance((p.get("gridPos") or {}).get(k), int) for k in ("h", "w", "x", "y"))
                or (p.get("gridPos") or {}).get("x", 0) + (p.get("gridPos") or {}).get("w", 0) > 24]
    c.check(f"{label}: every panel has a gridPos within 24 columns", not bad_grid, f"panels {bad_grid}")
    rows = [p.get("title") for p in panels if p.get("type") == "row"]
    if label == "parley.json":
        c.check(f"{label}: rows Gateways, Routers and Operator", rows == ["Gateways", "Routers", "Operator"],
                f"rows {rows}")

    variables = {v.get("name"): v for v in (dashboard.get("templating") or {}).get("list", [])}
    datasource = variables.get("datasource") or {}
    c.check(f"{label}: a `datasource` variable of type datasource, query prometheus",
            datasource.get("type") == "datasource" and datasource.get("query") == "prometheus",
            f"datasource variable {datasource}")
    wanted_ds = {"type": "prometheus", "uid": "${datasource}"}
    bad_ds = []
    queries = []  # (where, PromQL)
    for panel in panels:
        if panel.get("type") == "row":
            continue
        if panel.get("datasource") != wanted_ds:
            bad_ds.append(f"panel {panel.get('title')!r}")
        targets = panel.get("targets") or []
        if not targets:
            bad_ds.append(f"panel {panel.get('title')!r} has no query")
        for target in targets:
            if target.get("datasource", wanted_ds) != wanted_ds:
                bad_ds.append(f"panel {panel.get('title')!r} query {target.get('refId')}")
            if not (target.get("expr") or "").strip():
                bad_ds.append(f"panel {panel.get('title')!r} query {target.get('refId')} has no expr")
            queries.append((f"panel {panel.get('title')!r} {target.get('refId')}", target.get("expr") or ""))
    for name, variable in variables.items():
        if variable.get("type") != "query":
            continue
        if variable.get("datasource") != wanted_ds:
            bad_ds.append(f"variable {name}")
        selector, _ = variable_query(variable.get("query"))
        if not selector:
            bad_ds.append(f"variable {name}: label_values without a metric selector")
        queries.append((f"variable {name}", selector))
    c.check(f"{label}: every panel, query and query variable uses the ${{datasource}} variable and has an expression",
            not bad_ds, "; ".join(bad_ds))
    for wanted in ("region", "pod"):
        c.check(f"{label}: a `{wanted}` query variable", (variables.get(wanted) or {}).get("type") == "query",
                f"variables {sorted(variables)}")

    used, unknown, problems, misuse, undefined = set(), {}, [], [], set()
    for where, expr in queries:
        found, referenced, expr_problems = promql_metrics(expr)
        problems += [f"{where}: {p}" for p in expr_problems]
        undefined |= {v for v in referenced if v not in variables and v not in GRAFANA_BUILTINS}
        if not found:
            problems.append(f"{where}: no metric name in {expr!r}")
        for metric, functions in found:
            used.add(metric)
            kind = names.get(metric) or ANNOUNCED.get(metric)
            if kind is None:
                unknown.setdefault(metric, where)
                continue
            if kind == "gauge" and RATE_FUNCTIONS & set(functions):
                misuse.append(f"{where}: {metric} is a gauge inside {sorted(RATE_FUNCTIONS & set(functions))}")
            if metric.endswith("_bucket") and "histogram_quantile" not in functions:
                misuse.append(f"{where}: {metric} outside histogram_quantile")
    c.check(f"{label}: every query parses into metric names", not problems, "; ".join(problems))
    c.check(f"{label}: every $variable is defined", not undefined, f"undefined {sorted(undefined)}")
    c.check(f"{label}: each of the {len(used)} metric names in the queries is registered by the code",
            not unknown, "; ".join(f"{m} (in {w}) is not exposed by any registration the scan found" +
                                   (f"; did you mean {close_names(m, names)}?" if close_names(m, names) else "")
                                   for m, w in sorted(unknown.items())))
    c.check(f"{label}: rate()/increase() only over counters and histograms, _bucket only in histogram_quantile",
            not misuse, "; ".join(misuse))
    for metric in sorted(set(ANNOUNCED) & used):
        if metric in names:
            c.check(f"{label}: {metric} (a listed exception) is now registered by the code; its ANNOUNCED entry can go",
                    names[metric] == ANNOUNCED[metric], f"registered as a {names[metric]}, listed as a {ANNOUNCED[metric]}")
        else:
            c.check(f"{label}: {metric} is not registered in the sources yet: accepted as a listed exception "
                    f"(ANNOUNCED)", True)
    return unknown


def close_names(metric, names):
    stem = re.sub(r"_(total|bucket|sum|count)$", "", metric)
    return sorted(n for n in names if re.sub(r"_(total|bucket|sum|count)$", "", n) == stem and n != metric)[:3]


def check_catches_made_up_names(c, names):
    """The check itself: a made-up name, a gauge read as a counter and a counter without _total are all caught."""
    for bad in ("parley_gateway_made_up_total", "parley_gateway_connections_total", "parley_router_messages"):
        probe = {"schemaVersion": 39, "uid": "probe", "title": "probe", "id": None,
                 "templating": {"list": [{"name": "datasource", "type": "datasource", "query": "prometheus"}]},
                 "panels": [{"id": 1, "type": "timeseries", "title": "probe", "gridPos": {"h": 1, "w": 1, "x": 0, "y": 0},
                             "datasource": {"type": "prometheus", "uid": "${datasource}"},
                             "targets": [{"refId": "A", "expr": f"sum(rate({bad}[5m]))"}]}]}
        unknown = check_dashboard_object(Checker(quiet=True), "probe", probe, names)
        c.check(f"self-test: a query of {bad} (not exposed) is refused", bad in unknown, f"unknown names {unknown}")


def check_scrapes(c, names, files):
    for path in files:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
        samples = {line.split("{")[0].split(" ")[0] for line in text.splitlines()
                   if line.startswith("parley_")}
        missing = sorted(samples - set(names))
        c.check(f"scrape {path}: its {len(samples)} parley_* sample names are all in the source scan",
                samples and not missing, f"not found by the scan: {missing}" if missing else "no parley_* samples")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True, help="the repository (workspace) root")
    parser.add_argument("--dashboards", default=None,
                        help="directory of the dashboards (default: charts/parley/dashboards under --root)")
    parser.add_argument("--scrape", nargs="*", default=[], help="/metrics answers to compare the scan with")
    parser.add_argument("--list", action="store_true", help="print the exposed names the scan found, then check")
    args = parser.parse_args()
    directory = args.dashboards or os.path.join(args.root, "charts", "parley", "dashboards")

    c = Checker()
    names = scan_sources(c, args.root)
    if args.list:
        for name in sorted(names):
            print(f"# {name} {names[name]}")
    check_catches_made_up_names(c, names)
    dashboards = sorted(glob.glob(os.path.join(directory, "*.json")))
    c.check(f"dashboards found in {directory}", dashboards, "no *.json")
    for path in dashboards:
        check_dashboard(c, path, names)
    check_scrapes(c, names, args.scrape)
    print(f"check_dashboard: {c.passed} passed, {c.failed} failed")
    return 1 if c.failed else 0


if __name__ == "__main__":
    sys.exit(main())
