//! Metrics: `proxy_define_metric` returns ids, values are stored by name so tests
//! read them back by name. Semantics follow Envoy's `context.cc` (counter
//! increments must be positive, histograms cannot be read, ids carry the type
//! in their low two bits).

use std::collections::{BTreeMap, HashMap};

use wasmtime::{Caller, Linker};

use super::ENV;
use crate::abi::{MetricType, Status};
use crate::memory::{self, HostResult, reply};
use crate::state::HostState;

/// A VM's metric store.
#[derive(Debug, Default)]
pub(crate) struct Metrics {
    ids: HashMap<u32, (MetricType, String)>,
    last_index: u32,
    pub(crate) counters: BTreeMap<String, u64>,
    pub(crate) gauges: BTreeMap<String, i64>,
    pub(crate) histograms: BTreeMap<String, Vec<u64>>,
}

impl Metrics {
    /// Defines a metric (or re-defines one: same name, same value) and returns a new id.
    pub(crate) fn define(&mut self, ty: MetricType, name: String) -> u32 {
        match ty {
            MetricType::Counter => {
                self.counters.entry(name.clone()).or_insert(0);
            }
            MetricType::Gauge => {
                self.gauges.entry(name.clone()).or_insert(0);
            }
            MetricType::Histogram => {
                self.histograms.entry(name.clone()).or_default();
            }
        }
        self.last_index += 1;
        let id = (self.last_index << 2) | ty.code();
        self.ids.insert(id, (ty, name));
        id
    }

    fn lookup(&self, id: u32) -> Result<(MetricType, String), Status> {
        self.ids.get(&id).cloned().ok_or(Status::NotFound)
    }

    pub(crate) fn increment(&mut self, id: u32, offset: i64) -> Result<(), Status> {
        let (ty, name) = self.lookup(id)?;
        match ty {
            MetricType::Counter if offset > 0 => {
                let c = self.counters.entry(name).or_insert(0);
                *c = c.saturating_add(offset as u64);
                Ok(())
            }
            MetricType::Counter | MetricType::Histogram => Err(Status::BadArgument),
            MetricType::Gauge => {
                let g = self.gauges.entry(name).or_insert(0);
                *g = g.saturating_add(offset);
                Ok(())
            }
        }
    }

    pub(crate) fn record(&mut self, id: u32, value: u64) -> Result<(), Status> {
        let (ty, name) = self.lookup(id)?;
        match ty {
            MetricType::Counter => {
                let c = self.counters.entry(name).or_insert(0);
                *c = c.saturating_add(value);
            }
            MetricType::Gauge => {
                self.gauges.insert(name, value as i64);
            }
            MetricType::Histogram => self.histograms.entry(name).or_default().push(value),
        }
        Ok(())
    }

    pub(crate) fn get(&self, id: u32) -> Result<u64, Status> {
        let (ty, name) = self.lookup(id)?;
        match ty {
            MetricType::Counter => Ok(self.counters.get(&name).copied().unwrap_or(0)),
            MetricType::Gauge => Ok(self.gauges.get(&name).copied().unwrap_or(0) as u64),
            MetricType::Histogram => Err(Status::BadArgument),
        }
    }
}

pub(crate) fn add_to_linker(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    linker.func_wrap(
        ENV,
        "proxy_define_metric",
        |mut c: Caller<'_, HostState>, ty: i32, name_ptr: i32, name_len: i32, id_ptr: i32| {
            reply(define(&mut c, ty, name_ptr, name_len, id_ptr))
        },
    )?;
    linker.func_wrap(
        ENV,
        "proxy_increment_metric",
        |mut c: Caller<'_, HostState>, id: i32, offset: i64| {
            reply(
                c.data_mut()
                    .metrics
                    .increment(id as u32, offset)
                    .map_err(Into::into),
            )
        },
    )?;
    linker.func_wrap(
        ENV,
        "proxy_record_metric",
        |mut c: Caller<'_, HostState>, id: i32, value: i64| {
            reply(
                c.data_mut()
                    .metrics
                    .record(id as u32, value as u64)
                    .map_err(Into::into),
            )
        },
    )?;
    linker.func_wrap(
        ENV,
        "proxy_get_metric",
        |mut c: Caller<'_, HostState>, id: i32, value_ptr: i32| reply(get(&mut c, id, value_ptr)),
    )?;
    Ok(())
}

fn define(
    c: &mut Caller<'_, HostState>,
    ty: i32,
    name_ptr: i32,
    name_len: i32,
    id_ptr: i32,
) -> HostResult {
    let ty = MetricType::from_raw(ty).ok_or(Status::BadArgument)?;
    let name = memory::read_string(c, name_ptr, name_len)?;
    let id = c.data_mut().metrics.define(ty, name);
    memory::write_u32(c, id_ptr, id)?;
    Ok(())
}

fn get(c: &mut Caller<'_, HostState>, id: i32, value_ptr: i32) -> HostResult {
    let value = c.data().metrics.get(id as u32)?;
    memory::write_u64(c, value_ptr, value)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn follows_envoy_semantics() {
        let mut m = Metrics::default();
        let c = m.define(MetricType::Counter, "requests".into());
        let g = m.define(MetricType::Gauge, "active".into());
        let h = m.define(MetricType::Histogram, "latency".into());
        assert_eq!(c & 3, 0);
        assert_eq!(g & 3, 1);
        assert_eq!(h & 3, 2);
        m.increment(c, 2).expect("positive");
        assert_eq!(m.increment(c, 0), Err(Status::BadArgument));
        assert_eq!(m.increment(c, -1), Err(Status::BadArgument));
        m.record(c, 3).expect("record adds to a counter");
        assert_eq!(m.get(c), Ok(5));
        m.increment(g, -4).expect("gauges go down");
        assert_eq!(m.get(g), Ok((-4i64) as u64));
        m.record(g, 7).expect("set");
        assert_eq!(m.gauges["active"], 7);
        m.record(h, 10).expect("histogram");
        assert_eq!(m.get(h), Err(Status::BadArgument));
        assert_eq!(m.histograms["latency"], vec![10]);
        assert_eq!(m.get(999), Err(Status::NotFound));
        let c2 = m.define(MetricType::Counter, "requests".into());
        assert_ne!(c2, c);
        assert_eq!(m.get(c2), Ok(5), "same name, same value");
    }
}
