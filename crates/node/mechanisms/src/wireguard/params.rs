//! WIREGUARD's mechanism parameters of nsm's own (lanes): parsed to a reason string, which the
//! caller puts in an error naming the parameter.

use std::collections::HashMap;

use super::DST_LANE_PORTS;

/// Parses a lane-ports parameter: at most `MAX_LANES - 1` non-zero ports, comma-separated; empty
/// or absent is none.
pub fn parse_lane_ports(v: Option<&String>) -> Result<Vec<u16>, String> {
    let Some(v) = v.filter(|v| !v.is_empty()) else {
        return Ok(Vec::new());
    };
    let ports = v
        .split(',')
        .map(|p| p.trim().parse::<u16>().ok().filter(|p| *p > 0))
        .collect::<Option<Vec<u16>>>()
        .ok_or_else(|| format!("{v:?}: expected UDP ports, comma-separated"))?;
    if ports.len() >= nsm_wireguard::MAX_LANES {
        return Err(format!(
            "{} ports; at most {}",
            ports.len(),
            nsm_wireguard::MAX_LANES - 1
        ));
    }
    Ok(ports)
}

/// The ports of the endpoint end's lanes after the first, from its node's answer: a malformed
/// value, or more lanes than this node runs (so more than it offered), is refused, because every
/// lane the endpoint built needs its peer here.
pub fn answered_lanes(params: &HashMap<String, String>, lanes: usize) -> Result<Vec<u16>, String> {
    let ports = parse_lane_ports(params.get(DST_LANE_PORTS))
        .map_err(|e| format!("the endpoint's node answered a bad {DST_LANE_PORTS}: {e}"))?;
    if ports.len() + 1 > lanes {
        return Err(format!(
            "the endpoint's node answered {} WireGuard lanes; this node offered {lanes}",
            ports.len() + 1
        ));
    }
    Ok(ports)
}

/// A lane-ports parameter's value.
pub fn format_lane_ports(ports: &[u16]) -> String {
    ports.iter().map(u16::to_string).collect::<Vec<_>>().join(",")
}
