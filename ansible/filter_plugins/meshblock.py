"""Filters for the Meshblock playbooks.

`meshblock_inventory_problems` checks a whole inventory before any host is touched and
returns every problem it finds, each as a sentence saying what to fix (an empty list means
the inventory is usable). `meshblock_addresses` turns a group into `ip:port` strings.
"""

import re

from ansible.errors import AnsibleUndefinedVariable

CLUSTER_MODES = {"1_node": 1, "3_node": 3, "5_node": 5}
# Names the MDM accepts for protection domains, fault sets, pools, SDS, SDC and MDMs.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


def _get(hostvars, host, key, default=None):
    try:
        value = hostvars[host][key]
    except (KeyError, AnsibleUndefinedVariable):
        return default
    return default if value is None else value


def _host_ip(hostvars, host):
    ip = _get(hostvars, host, "meshblock_ip")
    if ip:
        return ip
    facts = _get(hostvars, host, "ansible_default_ipv4", {}) or {}
    return facts.get("address")


def meshblock_addresses(hosts, hostvars, port):
    """`ip:port` of each host: its meshblock_ip, else the address of its default route."""
    return ["%s:%s" % (_host_ip(hostvars, h), port) for h in hosts]


def _check_topology(pds, problems):
    """The protection domains, fault sets and pools the inventory defines, by name."""
    if not isinstance(pds, list) or not pds:
        problems.append(
            "meshblock_protection_domains is empty: define at least one protection domain "
            "with at least one storage pool, e.g. [{name: pd1, storage_pools: [{name: sp1}]}]"
        )
        return {}, {}
    pools = {}
    fault_sets = {}
    for i, pd in enumerate(pds):
        name = pd.get("name") if isinstance(pd, dict) else None
        if not name or not NAME_RE.match(str(name)):
            problems.append(
                "meshblock_protection_domains[%d] needs a name (letters, digits, '_', '.', "
                "'-'; at most 63 characters), got %r" % (i, name)
            )
            continue
        if name in fault_sets:
            problems.append("protection domain %s is defined twice in meshblock_protection_domains" % name)
        fault_sets[name] = set()
        for fs in pd.get("fault_sets") or []:
            if not NAME_RE.match(str(fs)):
                problems.append("fault set name %r in protection domain %s is not a valid name" % (fs, name))
            fault_sets[name].add(str(fs))
        sps = pd.get("storage_pools") or []
        if not sps:
            problems.append(
                "protection domain %s has no storage pool: add storage_pools: [{name: sp1}]" % name
            )
        for sp in sps:
            sp_name = sp.get("name") if isinstance(sp, dict) else None
            if not sp_name or not NAME_RE.match(str(sp_name)):
                problems.append("a storage pool of protection domain %s has no valid name (%r)" % (name, sp_name))
                continue
            if sp_name in pools:
                problems.append(
                    "storage pool %s is defined in protection domains %s and %s: pool names are "
                    "unique in a cluster" % (sp_name, pools[sp_name], name)
                )
            pools[sp_name] = name
            media = sp.get("media_type")
            if media is not None and media not in ("HDD", "SSD"):
                problems.append("storage pool %s: media_type must be HDD or SSD, got %r" % (sp_name, media))
    return pools, fault_sets


def _check_mdms(groups, hostvars, mode, problems):
    mdms = list(groups.get("mdm", []))
    if mode not in CLUSTER_MODES:
        problems.append(
            "meshblock_cluster_mode is %r and group mdm has %d hosts: a cluster has 1, 3 or 5 MDM "
            "hosts and meshblock_cluster_mode says which (1_node, 3_node or 5_node)" % (mode, len(mdms))
        )
    elif len(mdms) != CLUSTER_MODES[mode]:
        problems.append(
            "meshblock_cluster_mode %s needs exactly %d hosts in group mdm, the inventory has %d "
            "(%s): add or remove MDM hosts, or set meshblock_cluster_mode to %s"
            % (
                mode,
                CLUSTER_MODES[mode],
                len(mdms),
                ", ".join(mdms) or "none",
                {1: "1_node", 3: "3_node", 5: "5_node"}.get(len(mdms), "1_node, 3_node or 5_node with an odd number of MDM hosts"),
            )
        )
    names = {}
    for h in mdms:
        n = _get(hostvars, h, "meshblock_mdm_name", h)
        if n in names:
            problems.append("MDM hosts %s and %s both have the MDM name %s" % (names[n], h, n))
        names[n] = h


def _check_sds(groups, hostvars, pools, fault_sets, default_pd, problems):
    names = {}
    for h in groups.get("sds", []):
        name = str(_get(hostvars, h, "meshblock_sds_name", h))
        if not NAME_RE.match(name):
            problems.append("SDS host %s: meshblock_sds_name %r is not a valid name" % (h, name))
        if name in names:
            problems.append("SDS hosts %s and %s both have the SDS name %s" % (names[name], h, name))
        names[name] = h
        pd = _get(hostvars, h, "meshblock_sds_protection_domain", default_pd)
        if pd not in fault_sets:
            problems.append(
                "SDS host %s is in protection domain %r, which meshblock_protection_domains does "
                "not define (defined: %s)" % (h, pd, ", ".join(sorted(fault_sets)) or "none")
            )
        fs = _get(hostvars, h, "meshblock_sds_fault_set", "")
        if fs and pd in fault_sets and fs not in fault_sets[pd]:
            problems.append(
                "SDS host %s is in fault set %r, which protection domain %s does not define "
                "(add it to its fault_sets)" % (h, fs, pd)
            )
        devices = _get(hostvars, h, "meshblock_sds_devices", [])
        if not isinstance(devices, list) or not devices:
            problems.append(
                "SDS host %s has no device: set meshblock_sds_devices to a list such as "
                "[{path: /dev/sdb, pool: sp1}] (or remove the host from group sds)" % h
            )
            continue
        seen = set()
        for d in devices:
            path = d.get("path") if isinstance(d, dict) else d
            pool = (d.get("pool") if isinstance(d, dict) else None) or _get(hostvars, h, "meshblock_sds_pool")
            if not path or not str(path).startswith("/"):
                problems.append("SDS host %s: device %r needs an absolute path" % (h, d))
                continue
            if path in seen:
                problems.append("SDS host %s lists device %s twice" % (h, path))
            seen.add(path)
            if not pool:
                problems.append(
                    "SDS host %s: device %s names no storage pool (give it pool: NAME, or set "
                    "meshblock_sds_pool)" % (h, path)
                )
            elif pool not in pools:
                problems.append(
                    "SDS host %s: device %s uses storage pool %r, which meshblock_protection_domains "
                    "does not define (defined: %s)" % (h, path, pool, ", ".join(sorted(pools)) or "none")
                )
            elif pd in fault_sets and pools[pool] != pd:
                problems.append(
                    "SDS host %s: device %s uses storage pool %s of protection domain %s, but the SDS "
                    "is in protection domain %s" % (h, path, pool, pools[pool], pd)
                )


def meshblock_inventory_problems(hostvars, groups, settings):
    """Every problem of the inventory, as sentences; `settings` holds the cluster-wide variables."""
    problems = []
    for g in ("mdm", "sds"):
        if not groups.get(g):
            problems.append("group %s is empty: a cluster needs at least one %s host" % (g, g.upper()))
    pools, fault_sets = _check_topology(settings.get("protection_domains"), problems)
    _check_mdms(groups, hostvars, settings.get("cluster_mode"), problems)
    default_pd = None
    pds = settings.get("protection_domains")
    if isinstance(pds, list) and pds and isinstance(pds[0], dict):
        default_pd = pds[0].get("name")
    _check_sds(groups, hostvars, pools, fault_sets, default_pd, problems)
    if len(str(settings.get("admin_password") or "")) < 6:
        problems.append(
            "meshblock_admin_password is missing or shorter than 6 characters: set it (e.g. with "
            "ansible-vault, or lookup('file', ...))"
        )
    if settings.get("sdc_docker") and groups.get("sdc"):
        if len(str(settings.get("docker_password") or "")) < 6:
            problems.append(
                "meshblock_docker_password is missing or shorter than 6 characters: the SDCs' Docker "
                "plugin logs in as %s with it (or set meshblock_sdc_docker: false)"
                % settings.get("docker_username")
            )
    if not settings.get("version"):
        problems.append("meshblock_version is not set: the version of the packages to install, e.g. 0.1.0")
    return problems


def meshblock_used_pools(hostvars, groups):
    """The storage pools some SDS device of the inventory is in, sorted."""
    used = set()
    for h in groups.get("sds", []):
        for d in _get(hostvars, h, "meshblock_sds_devices", []) or []:
            pool = (d.get("pool") if isinstance(d, dict) else None) or _get(hostvars, h, "meshblock_sds_pool")
            if pool:
                used.add(str(pool))
    return sorted(used)


def meshblock_devices(devices, default_pool):
    """An SDS's devices as [{path, pool}], a bare path going to `default_pool`."""
    out = []
    for d in devices or []:
        if isinstance(d, dict):
            out.append({"path": d["path"], "pool": d.get("pool") or default_pool})
        else:
            out.append({"path": d, "pool": default_pool})
    return out


def meshblock_dpkg_versions(lines):
    """{package: version} of the installed packages in `dpkg-query -W -f='${Package} ${Version}
    ${db:Status-Abbrev}\\n'` output (packages not fully installed are left out)."""
    out = {}
    for line in lines or []:
        parts = line.split()
        if len(parts) >= 3 and parts[2] == "ii":
            out[parts[0]] = parts[1]
    return out


def meshblock_missing_objects(state, protection_domains):
    """What of the inventory's protection domains, fault sets and pools the cluster state (the
    `state` of `scli --query_all --json`) lacks: {pds: [name], fault_sets: [{pd, name}],
    pools: [{pd, name, media_type?, pg_count?}]}."""
    pd_ids = {pd["name"]: pd["id"] for pd in state.get("pds", {}).values()}
    fault_sets = {(fs["pd"], fs["name"]) for fs in state.get("fault_sets", {}).values()}
    pools = {p["name"] for p in state.get("pools", {}).values()}
    out = {"pds": [], "fault_sets": [], "pools": []}
    for pd in protection_domains:
        pd_id = pd_ids.get(pd["name"])
        if pd_id is None:
            out["pds"].append(pd["name"])
        for fs in pd.get("fault_sets") or []:
            if pd_id is None or (pd_id, fs) not in fault_sets:
                out["fault_sets"].append({"pd": pd["name"], "name": fs})
        for sp in pd.get("storage_pools") or []:
            if sp["name"] not in pools:
                pool = {"pd": pd["name"], "name": sp["name"]}
                for key in ("media_type", "pg_count"):
                    if sp.get(key) is not None:
                        pool[key] = str(sp[key])
                out["pools"].append(pool)
    return out


def meshblock_sds_in(state, name):
    """The SDS called `name` in the cluster state, or None."""
    for sds in state.get("sds", {}).values():
        if sds["name"] == name:
            return sds
    return None


def meshblock_missing_devices(state, name, devices, default_pool):
    """The devices ([{path, pool}]) of SDS `name` the cluster does not know yet (all of them
    when the SDS is not in the cluster)."""
    sds = meshblock_sds_in(state, name)
    known = {d["path"] for d in sds["devices"]} if sds else set()
    return [d for d in meshblock_devices(devices, default_pool) if d["path"] not in known]


class FilterModule(object):
    def filters(self):
        return {
            "meshblock_inventory_problems": meshblock_inventory_problems,
            "meshblock_addresses": meshblock_addresses,
            "meshblock_used_pools": meshblock_used_pools,
            "meshblock_devices": meshblock_devices,
            "meshblock_dpkg_versions": meshblock_dpkg_versions,
            "meshblock_missing_objects": meshblock_missing_objects,
            "meshblock_sds_in": meshblock_sds_in,
            "meshblock_missing_devices": meshblock_missing_devices,
        }
