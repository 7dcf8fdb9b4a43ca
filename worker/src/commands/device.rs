//! `--device` as every subcommand takes it.

use anyhow::Context;
use proto::job::parse_device;
use worker::runtime;

/// The device `device` (`auto`, `cpu`, `cuda`, `cuda:N`) names on this machine.
pub fn select(device: &str, info: &runtime::RuntimeInfo) -> anyhow::Result<tch::Device> {
    let request = parse_device(device)
        .with_context(|| format!("--device {device:?}: expected auto, cpu, cuda or cuda:N"))?;
    Ok(runtime::select_device(request, info)?)
}
