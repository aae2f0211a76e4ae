//! The serializable state of a VM: plain types beside the live ones they describe.

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_fpu, kvm_mp_state, kvm_msr_entry,
    kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use serde::{Deserialize, Serialize};

use super::checksum::MemoryChecksums;

/// Full snapshots hold all of RAM; diffs hold the pages written since their parent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotKind {
    Full,
    Diff,
}

/// The snapshot a diff builds on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParentRef {
    /// Absolute path of the parent snapshot directory when this one was written.
    pub path: String,
    /// The parent's [`SnapshotState::id`] (format version 2 on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// CRC32 of the parent's `state` file (format version 1, which had no ids).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_crc: Option<u32>,
}

impl ParentRef {
    /// The identity the parent must have: its id, or for a version-1 reference the id that
    /// stands in for a version-1 snapshot (see [`crc_id`]).
    pub fn expected_id(&self) -> Option<String> {
        self.id.clone().or(self.state_crc.map(crc_id))
    }
}

/// The id of a snapshot written before ids existed (format version 1): its state file's CRC.
/// `merge` carries it over, so diffs built on a version-1 snapshot stay valid after a merge.
pub fn crc_id(state_crc: u32) -> String {
    format!("crc32:{state_crc:08x}")
}

/// Everything in `state`. Fields added after format version 1 have `#[serde(default)]`: their
/// documented defaults are what a version-1 file means.
#[derive(Debug, Serialize, Deserialize)]
pub struct SnapshotState {
    /// A random UUID given when the snapshot is taken and kept by `merge` (which produces the
    /// same VM state), so that diffs naming it stay valid. Absent in version 1: see [`crc_id`].
    #[serde(default)]
    pub id: Option<String>,
    pub kind: SnapshotKind,
    pub parent: Option<ParentRef>,
    pub mem_size: u64,
    pub memory: MemoryState,
    pub vm: VmState,
    pub vcpus: Vec<VcpuState>,
    pub serial: SerialState,
    /// The VM's disks and their frozen image chains (format version 3 on). Absent before: a
    /// version 1 or 2 snapshot had no disks.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<super::disks::DiskState>,
}

/// What `memory` holds.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryState {
    /// Page runs `(first page, page count)` stored in a diff, at file offset page × 4 KiB.
    /// Empty for a full snapshot, where every page is present (holes read as zero).
    pub runs: Vec<(u64, u64)>,
    /// Pages stored with data (for a full snapshot: the pages that are not zero).
    pub pages_stored: u64,
    /// Checksums of the `memory` file, checked by `--verify`. Absent in version 1.
    #[serde(default)]
    pub checksums: Option<MemoryChecksums>,
}

/// VM-wide KVM state.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmState {
    pub clock: Option<kvm_clock_data>,
}

/// One vCPU, in the order Firecracker saves it (see `Vcpu::save_state`).
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    pub mp_state: Option<kvm_mp_state>,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    /// XSAVE area when the host supports it; else the legacy FPU state.
    pub xsave: Option<kvm_xsave>,
    pub fpu: Option<FpuState>,
    pub xcrs: Option<kvm_xcrs>,
    pub debug_regs: Option<kvm_debugregs>,
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub msrs: Vec<kvm_msr_entry>,
    pub vcpu_events: Option<kvm_vcpu_events>,
}

/// `kvm_fpu`, which kvm-bindings cannot serialize.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FpuState {
    pub fpr: Vec<[u8; 16]>,
    pub fcw: u16,
    pub fsw: u16,
    pub ftwx: u8,
    pub last_opcode: u16,
    pub last_ip: u64,
    pub last_dp: u64,
    pub xmm: Vec<[u8; 16]>,
    pub mxcsr: u32,
}

impl From<&kvm_fpu> for FpuState {
    fn from(f: &kvm_fpu) -> Self {
        Self {
            fpr: f.fpr.to_vec(),
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm.to_vec(),
            mxcsr: f.mxcsr,
        }
    }
}

impl From<&FpuState> for kvm_fpu {
    fn from(f: &FpuState) -> Self {
        let mut fpu = kvm_fpu {
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            mxcsr: f.mxcsr,
            ..Default::default()
        };
        for (dst, src) in fpu.fpr.iter_mut().zip(&f.fpr) {
            *dst = *src;
        }
        for (dst, src) in fpu.xmm.iter_mut().zip(&f.xmm) {
            *dst = *src;
        }
        fpu
    }
}

/// The 16550's registers (vm-superio's `SerialState`, which has no serde support).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialState {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

impl From<&vm_superio::serial::SerialState> for SerialState {
    fn from(s: &vm_superio::serial::SerialState) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

impl From<&SerialState> for vm_superio::serial::SerialState {
    fn from(s: &SerialState) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fpu_state_round_trips() {
        let mut fpu = kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            last_ip: 9,
            ..Default::default()
        };
        fpu.xmm[3] = [7; 16];
        fpu.fpr[1] = [1; 16];
        let state = FpuState::from(&fpu);
        let json = serde_json::to_string(&state).unwrap();
        let back: FpuState = serde_json::from_str(&json).unwrap();
        let restored = kvm_fpu::from(&back);
        assert_eq!(
            (restored.fcw, restored.mxcsr, restored.last_ip),
            (0x37f, 0x1f80, 9)
        );
        assert_eq!((restored.xmm[3], restored.fpr[1]), ([7; 16], [1; 16]));
    }

    #[test]
    fn serial_state_round_trips() {
        let live = vm_superio::serial::SerialState {
            line_control: 3,
            scratch: 0x5a,
            in_buffer: vec![1, 2],
            ..Default::default()
        };
        let saved = SerialState::from(&live);
        let json = serde_json::to_string(&saved).unwrap();
        let back: SerialState = serde_json::from_str(&json).unwrap();
        assert_eq!(vm_superio::serial::SerialState::from(&back), live);
    }

    #[test]
    fn snapshot_kind_and_memory_state_round_trip() {
        let memory = MemoryState {
            runs: vec![(0, 3), (9, 1)],
            pages_stored: 4,
            checksums: None,
        };
        let json = serde_json::to_string(&(SnapshotKind::Diff, &memory)).unwrap();
        assert!(json.contains("\"diff\""), "{json}");
        let back: (SnapshotKind, MemoryState) = serde_json::from_str(&json).unwrap();
        assert_eq!(back, (SnapshotKind::Diff, memory));
    }

    #[test]
    fn version_1_parent_references_read_with_their_crc_as_id() {
        let v1: ParentRef = serde_json::from_str(r#"{"path":"/p","state_crc":123}"#).unwrap();
        assert_eq!(v1.expected_id().as_deref(), Some("crc32:0000007b"));
        let v2 = ParentRef {
            path: "/p".into(),
            id: Some("abc".into()),
            state_crc: None,
        };
        let json = serde_json::to_string(&v2).unwrap();
        assert_eq!(json, r#"{"path":"/p","id":"abc"}"#);
        assert_eq!(v2.expected_id().as_deref(), Some("abc"));
    }
}
