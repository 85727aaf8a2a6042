//! The few eBPF objects nsm needs — hash and LPM maps, `sched_cls` programs — made with the
//! raw `bpf(2)` syscall. Programs are small and written as instructions ([`Insn`]), so nsm needs
//! no compiler, ELF loader or libbpf at build or run time. This module holds the crate's only
//! `unsafe` code: the syscall itself.
#![allow(unsafe_code)]

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use crate::error::{DataplaneError, Result};

// Commands, map types and program types of `bpf(2)` (include/uapi/linux/bpf.h).
const BPF_MAP_CREATE: u32 = 0;
const BPF_MAP_LOOKUP_ELEM: u32 = 1;
const BPF_MAP_UPDATE_ELEM: u32 = 2;
const BPF_MAP_DELETE_ELEM: u32 = 3;
const BPF_MAP_GET_NEXT_KEY: u32 = 4;
const BPF_PROG_LOAD: u32 = 5;
const BPF_MAP_TYPE_HASH: u32 = 1;
const BPF_MAP_TYPE_LPM_TRIE: u32 = 11;
/// Entries allocated as they are added (required of LPM tries).
const BPF_F_NO_PREALLOC: u32 = 1;
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;

/// Size of the attribute block passed to every command: larger than any layout used here, and
/// zero past what each command reads (the kernel rejects non-zero bytes it does not know).
const ATTR_WORDS: usize = 18;

/// One `bpf(2)` call with `attr` as its attribute block; the new fd or value on success.
fn sys_bpf(cmd: u32, attr: &mut [u64; ATTR_WORDS]) -> io::Result<i64> {
    let size = std::mem::size_of_val(attr) as u32;
    // SAFETY: `attr` is a live, writable buffer of `size` bytes for the duration of the call, laid
    // out as the kernel's `union bpf_attr` for `cmd` (callers fill it through `Attr`); the kernel
    // reads and may write only within those `size` bytes. Pointers stored inside it (keys, values,
    // instructions, log buffers) point to buffers the callers keep alive across this call.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd as libc::c_long, attr.as_mut_ptr(), size) };
    if r < 0 { Err(io::Error::last_os_error()) } else { Ok(r) }
}

/// A `union bpf_attr` being filled field by field, at byte offsets.
struct Attr([u64; ATTR_WORDS]);

impl Attr {
    fn new() -> Attr {
        Attr([0; ATTR_WORDS])
    }

    fn u32(mut self, offset: usize, v: u32) -> Attr {
        let word = &mut self.0[offset / 8];
        let shift = (offset % 8) * 8;
        *word = (*word & !(0xffff_ffff << shift)) | (u64::from(v) << shift);
        self
    }

    fn u64(mut self, offset: usize, v: u64) -> Attr {
        debug_assert_eq!(offset % 8, 0);
        self.0[offset / 8] = v;
        self
    }

    /// A 16-byte object name (`map_name`, `prog_name`): at most 15 bytes, NUL-terminated.
    fn name(mut self, offset: usize, name: &str) -> Attr {
        let mut bytes = [0u8; 16];
        for (b, c) in bytes.iter_mut().zip(
            name.bytes()
                .filter(|c| c.is_ascii_alphanumeric() || *c == b'_')
                .take(15),
        ) {
            *b = c;
        }
        for (i, chunk) in bytes.chunks(4).enumerate() {
            self = self.u32(offset + 4 * i, u32::from_le_bytes(chunk.try_into().expect("4 bytes")));
        }
        self
    }

    fn call(mut self, cmd: u32) -> io::Result<i64> {
        sys_bpf(cmd, &mut self.0)
    }

    fn call_fd(self, cmd: u32) -> io::Result<OwnedFd> {
        let fd = self.call(cmd)?;
        // SAFETY: for the object-creating commands used here (MAP_CREATE, PROG_LOAD) a
        // non-negative result is a new file descriptor that nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
    }
}

fn err(op: &'static str, source: io::Error) -> DataplaneError {
    DataplaneError::Bpf {
        op,
        source,
        log: String::new(),
    }
}

/// A map with fixed-size keys and values; closed with its last fd (and the programs using it).
#[derive(Debug)]
pub struct Map {
    fd: OwnedFd,
    key_size: usize,
    value_size: usize,
}

impl Map {
    /// Creates a hash map holding up to `max_entries` entries, allocated as they are added (a
    /// preallocated one would pin `max_entries` entries of kernel memory from the start: ~5 MB for
    /// 65,536 small entries, per map).
    pub fn hash(name: &str, key_size: usize, value_size: usize, max_entries: u32) -> Result<Map> {
        Map::create(
            BPF_MAP_TYPE_HASH,
            BPF_F_NO_PREALLOC,
            name,
            key_size,
            value_size,
            max_entries,
        )
    }

    /// Creates a longest-prefix-match map: keys are a 4-byte prefix length (host order) followed
    /// by `addr_size` address bytes; a lookup with the full length finds the longest prefix.
    pub fn lpm_trie(name: &str, addr_size: usize, value_size: usize, max_entries: u32) -> Result<Map> {
        Map::create(
            BPF_MAP_TYPE_LPM_TRIE,
            BPF_F_NO_PREALLOC,
            name,
            4 + addr_size,
            value_size,
            max_entries,
        )
    }

    fn create(kind: u32, flags: u32, name: &str, key_size: usize, value_size: usize, max_entries: u32) -> Result<Map> {
        let fd = Attr::new()
            .u32(0, kind)
            .u32(4, key_size as u32)
            .u32(8, value_size as u32)
            .u32(12, max_entries)
            .u32(16, flags)
            .name(28, name)
            .call_fd(BPF_MAP_CREATE)
            .map_err(|e| err("create bpf map", e))?;
        Ok(Map {
            fd,
            key_size,
            value_size,
        })
    }

    fn check(&self, op: &'static str, key: &[u8], value: Option<&[u8]>) -> Result<()> {
        if key.len() != self.key_size || value.is_some_and(|v| v.len() != self.value_size) {
            return Err(DataplaneError::InvalidArgument {
                op,
                reason: format!(
                    "the map takes {}-byte keys and {}-byte values",
                    self.key_size, self.value_size
                ),
            });
        }
        Ok(())
    }

    /// Sets `key` to `value` (created or replaced).
    pub fn set(&self, key: &[u8], value: &[u8]) -> Result<()> {
        const OP: &str = "update bpf map";
        self.check(OP, key, Some(value))?;
        Attr::new()
            .u32(0, self.fd.as_raw_fd() as u32)
            .u64(8, key.as_ptr() as u64)
            .u64(16, value.as_ptr() as u64)
            .call(BPF_MAP_UPDATE_ELEM)
            .map(drop)
            .map_err(|e| err(OP, e))
    }

    /// The value of `key`, if the map holds it.
    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        const OP: &str = "look up bpf map";
        self.check(OP, key, None)?;
        let mut value = vec![0u8; self.value_size];
        match Attr::new()
            .u32(0, self.fd.as_raw_fd() as u32)
            .u64(8, key.as_ptr() as u64)
            .u64(16, value.as_mut_ptr() as u64)
            .call(BPF_MAP_LOOKUP_ELEM)
        {
            Ok(_) => Ok(Some(value)),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(e) => Err(err(OP, e)),
        }
    }

    /// Removes `key`; `false` if the map did not hold it.
    pub fn remove(&self, key: &[u8]) -> Result<bool> {
        const OP: &str = "delete from bpf map";
        self.check(OP, key, None)?;
        match Attr::new()
            .u32(0, self.fd.as_raw_fd() as u32)
            .u64(8, key.as_ptr() as u64)
            .call(BPF_MAP_DELETE_ELEM)
        {
            Ok(_) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
            Err(e) => Err(err(OP, e)),
        }
    }

    /// Makes the map hold exactly `entries` (key → value), writing only what differs: keys it
    /// lacks are removed first, then new and changed values set.
    pub fn replace_all(&self, entries: &HashMap<Vec<u8>, Vec<u8>>) -> Result<()> {
        for k in self.keys()? {
            if !entries.contains_key(&k) {
                self.remove(&k)?;
            }
        }
        for (k, v) in entries {
            if self.get(k)?.as_ref() != Some(v) {
                self.set(k, v)?;
            }
        }
        Ok(())
    }

    /// Every key the map holds.
    pub fn keys(&self) -> Result<Vec<Vec<u8>>> {
        let mut out: Vec<Vec<u8>> = Vec::new();
        loop {
            let mut next = vec![0u8; self.key_size];
            // No key at first: the kernel then returns the first one.
            let key = out.last().map_or(0, |k| k.as_ptr() as u64);
            match Attr::new()
                .u32(0, self.fd.as_raw_fd() as u32)
                .u64(8, key)
                .u64(16, next.as_mut_ptr() as u64)
                .call(BPF_MAP_GET_NEXT_KEY)
            {
                Ok(_) => out.push(next),
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(out),
                Err(e) => return Err(err("list bpf map", e)),
            }
        }
    }
}

/// One eBPF instruction (`struct bpf_insn`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Insn {
    code: u8,
    dst: u8,
    src: u8,
    off: i16,
    imm: i32,
}

/// Registers: r0 return value, r1–r5 arguments (clobbered by calls), r6–r9 kept across calls, r10
/// the read-only frame pointer.
pub type Reg = u8;

/// Operand sizes of loads and stores.
#[derive(Clone, Copy, Debug)]
pub enum Size {
    /// 1 byte.
    B,
    /// 2 bytes.
    H,
    /// 4 bytes.
    W,
}

impl Size {
    fn bits(self) -> u8 {
        match self {
            Size::W => 0x00,
            Size::H => 0x08,
            Size::B => 0x10,
        }
    }
}

/// Jump conditions, comparing a register with an immediate or another register (unsigned).
#[derive(Clone, Copy, Debug)]
pub enum Cond {
    /// `==`
    Eq,
    /// `!=`
    Ne,
    /// `>`
    Gt,
    /// `<`
    Lt,
}

impl Cond {
    fn bits(self) -> u8 {
        match self {
            Cond::Eq => 0x10,
            Cond::Gt => 0x20,
            Cond::Ne => 0x50,
            Cond::Lt => 0xa0,
        }
    }
}

// Instruction classes and modes (include/uapi/linux/bpf_common.h, bpf.h).
const LDX_MEM: u8 = 0x01 | 0x60;
const STX_MEM: u8 = 0x03 | 0x60;
const ALU64: u8 = 0x07;
const JMP: u8 = 0x05;
const K: u8 = 0x00;
const X: u8 = 0x08;

impl Insn {
    fn new(code: u8, dst: Reg, src: Reg, off: i16, imm: i32) -> Insn {
        Insn {
            code,
            dst,
            src,
            off,
            imm,
        }
    }
    /// `dst = *(size *)(src + off)`
    pub fn load(size: Size, dst: Reg, src: Reg, off: i16) -> Insn {
        Insn::new(LDX_MEM | size.bits(), dst, src, off, 0)
    }
    /// `*(size *)(dst + off) = src`
    pub fn store(size: Size, dst: Reg, off: i16, src: Reg) -> Insn {
        Insn::new(STX_MEM | size.bits(), dst, src, off, 0)
    }
    /// `dst = imm` (64-bit, sign-extended)
    pub fn mov_imm(dst: Reg, imm: i32) -> Insn {
        Insn::new(ALU64 | 0xb0 | K, dst, 0, 0, imm)
    }
    /// `dst = src`
    pub fn mov(dst: Reg, src: Reg) -> Insn {
        Insn::new(ALU64 | 0xb0 | X, dst, src, 0, 0)
    }
    /// `dst += imm` (64-bit)
    pub fn add_imm(dst: Reg, imm: i32) -> Insn {
        Insn::new(ALU64 | K, dst, 0, 0, imm)
    }
    /// `if dst <cond> imm goto +off`
    pub fn jump_imm(cond: Cond, dst: Reg, imm: i32, off: i16) -> Insn {
        Insn::new(JMP | cond.bits() | K, dst, 0, off, imm)
    }
    /// `if dst <cond> src goto +off`
    pub fn jump(cond: Cond, dst: Reg, src: Reg, off: i16) -> Insn {
        Insn::new(JMP | cond.bits() | X, dst, src, off, 0)
    }
    /// Calls helper number `id` (arguments in r1–r5, result in r0).
    pub fn call(id: i32) -> Insn {
        Insn::new(JMP | 0x80, 0, 0, 0, id)
    }
    /// Returns r0.
    pub fn exit() -> Insn {
        Insn::new(JMP | 0x90, 0, 0, 0, 0)
    }
    /// `dst = map` (two instruction slots: `BPF_LD | BPF_IMM | BPF_DW` with `BPF_PSEUDO_MAP_FD`).
    pub fn load_map(dst: Reg, map: &Map) -> [Insn; 2] {
        [Insn::new(0x18, dst, 1, 0, map.fd.as_raw_fd()), Insn::new(0, 0, 0, 0, 0)]
    }

    /// Whether this is a jump whose offset is the stand-in `placeholder`, not yet resolved.
    pub fn jumps_to(&self, placeholder: i16) -> bool {
        self.code & 0x07 == JMP && self.off == placeholder
    }

    /// Points this instruction, at index `at`, to index `target` if it is a jump whose offset is
    /// the stand-in `placeholder` (programs are written before their labels' places are known).
    pub fn resolve(&mut self, placeholder: i16, at: usize, target: usize) {
        if self.jumps_to(placeholder) {
            self.off = i16::try_from(target as isize - at as isize - 1).expect("programs are short");
        }
    }

    fn encode(self) -> u64 {
        u64::from(self.code)
            | u64::from(self.dst & 0xf) << 8
            | u64::from(self.src & 0xf) << 12
            | u64::from(self.off as u16) << 16
            | u64::from(self.imm as u32) << 32
    }
}

/// A loaded `sched_cls` program (tc, direct action); unloaded when its last fd and the last tc
/// filter running it are gone.
#[derive(Debug)]
pub struct Program {
    fd: OwnedFd,
}

impl Program {
    /// Loads `insns` as a tc classifier. A rejection by the verifier carries its log.
    pub fn load_tc(name: &str, insns: &[Insn]) -> Result<Program> {
        let code: Vec<u64> = insns.iter().map(|i| i.encode()).collect();
        let license = c"GPL";
        let attr = || {
            Attr::new()
                .u32(0, BPF_PROG_TYPE_SCHED_CLS)
                .u32(4, code.len() as u32)
                .u64(8, code.as_ptr() as u64)
                .u64(16, license.as_ptr() as u64)
                .name(48, name)
        };
        match attr().call_fd(BPF_PROG_LOAD) {
            Ok(fd) => Ok(Program { fd }),
            Err(source) => {
                // Again, with the verifier's log, to say why.
                let mut log = vec![0u8; 64 * 1024];
                let again = attr()
                    .u32(24, 1)
                    .u32(28, log.len() as u32)
                    .u64(32, log.as_mut_ptr() as u64)
                    .call_fd(BPF_PROG_LOAD);
                let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
                Err(DataplaneError::Bpf {
                    op: "load bpf program",
                    source: again.err().unwrap_or(source),
                    log: String::from_utf8_lossy(&log[..end]).trim_end().to_owned(),
                })
            }
        }
    }

    /// The program's fd, to attach it (see [`crate::Netlink::attach_tc_ingress`]).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instructions_encode_as_the_kernel_lays_them_out() {
        // r0 = -1: BPF_ALU64|BPF_MOV|BPF_K (0xb7), dst r0, imm 0xffffffff.
        assert_eq!(Insn::mov_imm(0, -1).encode(), 0xffff_ffff_0000_00b7);
        // r2 = *(u32 *)(r6 + 76): 0x61, dst 2, src 6, off 76.
        assert_eq!(Insn::load(Size::W, 2, 6, 76).encode(), 0x0000_0000_004c_6261);
        // if r4 > r3 goto +5: 0x2d, dst 4, src 3.
        assert_eq!(Insn::jump(Cond::Gt, 4, 3, 5).encode(), 0x0000_0000_0005_342d);
        // *(u8 *)(r2 + 22) = r5: 0x73.
        assert_eq!(Insn::store(Size::B, 2, 22, 5).encode(), 0x0000_0000_0016_5273);
        assert_eq!(Insn::call(1).encode(), 0x0000_0001_0000_0085);
        assert_eq!(Insn::exit().encode(), 0x95);
        assert_eq!(Insn::add_imm(2, -4).encode(), 0xffff_fffc_0000_0207);
    }

    #[test]
    fn attr_fields_land_at_their_offsets() {
        let a = Attr::new().u32(0, 1).u32(4, 2).u32(12, 3).u64(16, 4).name(28, "ab-c");
        assert_eq!(a.0[0], 2 << 32 | 1);
        assert_eq!(a.0[1], 3 << 32);
        assert_eq!(a.0[2], 4);
        // "abc" (the '-' is not a valid name character) from byte 28: the high half of word 3.
        assert_eq!(a.0[3] >> 32, u64::from(u32::from_le_bytes(*b"abc\0")));
    }
}
