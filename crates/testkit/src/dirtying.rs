//! A firmware that dirties guest RAM at a paced rate: the guest a convergence benchmark needs.
//!
//! Like the halting firmware ([`crate::qemu::write_firmware`]) it is a 64 KiB blob booted with
//! `-bios FILE`, hand-assembled here. From the reset vector it enters 32-bit protected mode
//! (a GDT with flat code and data segments, `lgdt`, CR0.PE, a far jump) and then loops for
//! ever over a region of RAM (from 1 MiB), writing one dword to every 4 KiB page of it per pass
//! (a value that changes from chunk to chunk, so that even page sampling sees the change).
//!
//! The writes come in chunks of [`CHUNK_PAGES`] pages, each with a deadline on the TSC
//! (`rdtsc`): the deadlines are a fixed interval apart, so the rate follows from the TSC
//! frequency. Until a chunk's deadline the vCPU sleeps (`hlt`) with the local APIC's one-shot
//! timer set to the time left, so an idle guest costs the host next to no CPU. A guest that
//! has fallen behind its schedule (QEMU's auto-converge throttle, the host's scheduler)
//! catches up by writing without pause, but only by [`DirtyConfig::max_lag`]: time lost beyond
//! that is lost for good, as it is for a CPU-bound workload.
//!
//! After each pass it stores the pass count at [`COUNTER_ADDR`], and it counts chunks at
//! [`CHUNKS_ADDR`]; QMP reads both back with [`read_counters`] to see that the guest runs (on
//! the destination, after a migration) and at which rate.
//!
//! The region, the chunk, the interval and the rest are 32-bit words in the blob's data area at
//! [`CONFIG_OFFSET`], patched by [`write_dirtying_firmware`]; the code reads them from ROM.
//! The guest's TSC runs at the host's under KVM and under TCG alike (TCG reads the host's
//! TSC), so [`tsc_hz`] measures the host's. The APIC timer is taken to count at 1 GHz, as
//! KVM's and QEMU's do; were it slower the guest would oversleep and lose rate.

use std::path::Path;
use std::time::{Duration, Instant};

/// Guest-physical address of the pass counter (a little-endian u32).
pub const COUNTER_ADDR: u64 = 0x1000;
/// Guest-physical address of [`MAGIC`], written once the guest runs in protected mode.
pub const MAGIC_ADDR: u64 = 0x1004;
/// Guest-physical address of the chunk counter (a little-endian u32): chunks of
/// [`CHUNK_PAGES`] pages written since boot, which tells the rate the guest kept.
pub const CHUNKS_ADDR: u64 = 0x1008;
/// What the firmware writes at [`MAGIC_ADDR`] when it has reached protected mode.
pub const MAGIC: u32 = 0x5144_4952; // "RIDQ" in memory
/// Where the dirtied region starts: 1 MiB, above the counters (page 0x1000), the interrupt
/// stack (page 0x7000) and the legacy holes.
pub const REGION_START: u64 = 1 << 20;
/// Pages written between two deadlines (64 KiB).
pub const CHUNK_PAGES: u32 = 16;
/// Offset of the data area in the 64 KiB blob (guest-physical `0xFFFF_0000` + offset).
pub const CONFIG_OFFSET: usize = 0xFE00;

/// The blob is mapped so that its last byte is at 4 GiB - 1.
const ROM_BASE: u32 = 0xFFFF_0000;
/// The IDT: 256 interrupt gates, all to the timer's handler.
const IDT_OFFSET: usize = 0xE800;
/// Where the real-mode code starts (the reset vector jumps here).
const REAL_MODE_OFFSET: usize = 0xF000;
/// The GDT and the pointers `lgdt` and `lidt` load.
const GDT_OFFSET: usize = 0xF040;
const GDT_PTR_OFFSET: usize = 0xF080;
const IDT_PTR_OFFSET: usize = 0xF088;
/// Where the 32-bit code starts.
const PROTECTED_OFFSET: usize = 0xF100;
/// Top of the interrupt stack (guest-physical).
const STACK_TOP: u32 = 0x8000;
/// The local APIC's registers (xAPIC mode, its reset base).
const APIC: u32 = 0xFEE0_0000;
const APIC_EOI: u32 = APIC + 0xB0;
const APIC_SVR: u32 = APIC + 0xF0;
const APIC_LVT_TIMER: u32 = APIC + 0x320;
const APIC_INITIAL_COUNT: u32 = APIC + 0x380;
const APIC_DIVIDE: u32 = APIC + 0x3E0;
/// The APIC timer's rate with divide-by-1 under KVM and QEMU.
const APIC_HZ: f64 = 1e9;
/// The timer's vector.
const TIMER_VECTOR: u32 = 0x20;
/// The rate-0 guest wakes up this often to count a pass.
const IDLE_PASS: Duration = Duration::from_millis(1);
/// Longest interval between two deadlines, in TSC ticks / 256: the sleep, converted to APIC
/// ticks, must fit in 32 bits (about 1.6 s at 2.6 GHz).
const MAX_INTERVAL: f64 = (1u32 << 24) as f64;

/// What the dirtying guest does.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DirtyConfig {
    /// Size of the dirtied region in MiB, from [`REGION_START`]: the guest needs at least
    /// `region_mib + 1` MiB of RAM.
    pub region_mib: u64,
    /// Bytes dirtied per second, in MiB (one 4 KiB page counts as 4 KiB however little of it
    /// is written). 0: the guest only counts passes, about a thousand a second, and dirties
    /// nothing but the counters' and the stack's pages. `f64::INFINITY`: as fast as the vCPU
    /// goes.
    pub rate_mib_s: f64,
    /// The guest's TSC frequency ([`tsc_hz`] for the host's).
    pub tsc_hz: u64,
    /// How far behind its schedule the guest may fall and still catch up.
    pub max_lag: Duration,
}

impl DirtyConfig {
    /// `rate_mib_s` over `region_mib` MiB, on the host's TSC (measured: 50 ms), catching up
    /// at most 5 ms: about the host scheduler's jitter, well under what auto-converge takes
    /// away from a vCPU (2.5 ms in every 12.5 at its first step, 20%).
    pub fn new(region_mib: u64, rate_mib_s: f64) -> DirtyConfig {
        DirtyConfig {
            region_mib,
            rate_mib_s,
            tsc_hz: tsc_hz(),
            max_lag: Duration::from_millis(5),
        }
    }
}

/// The words of the data area, in this order, as the code reads them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Words {
    /// First page of the region (guest-physical).
    start: u32,
    /// Chunks per pass (at least 1).
    chunks: u32,
    /// Pages per chunk (0: a pass is one empty chunk).
    chunk_pages: u32,
    /// Deadline step per chunk, in TSC ticks / 256.
    interval: u32,
    /// Lag beyond which the guest restarts its schedule, in TSC ticks / 256.
    max_lag: u32,
    /// APIC timer ticks per TSC tick / 256, times 2^16.
    apic_per_tick: u32,
}

impl DirtyConfig {
    fn words(&self) -> Result<Words, String> {
        if self.rate_mib_s.is_nan() || self.rate_mib_s < 0.0 {
            return Err(format!("dirty rate {} MiB/s is not >= 0", self.rate_mib_s));
        }
        if self.tsc_hz < 1_000_000 {
            return Err(format!("TSC frequency {} Hz", self.tsc_hz));
        }
        let ticks_per_s = self.tsc_hz as f64 / 256.0;
        let end = REGION_START + (self.region_mib << 20);
        if end > 0xB000_0000 {
            return Err(format!(
                "region of {} MiB reaches past the PCI hole",
                self.region_mib
            ));
        }
        let max_lag = (ticks_per_s * self.max_lag.as_secs_f64()).round();
        if max_lag >= MAX_INTERVAL {
            return Err(format!("catch-up limit {:?} is too long", self.max_lag));
        }
        let apic_per_tick = (APIC_HZ / ticks_per_s * 65536.0).round() as u32;
        let pages = (self.region_mib << 20) / 4096;
        if self.rate_mib_s == 0.0 || pages == 0 {
            return Ok(Words {
                start: REGION_START as u32,
                chunks: 1,
                chunk_pages: 0,
                interval: (ticks_per_s * IDLE_PASS.as_secs_f64()).round().max(1.0) as u32,
                max_lag: max_lag as u32,
                apic_per_tick,
            });
        }
        let chunk_bytes = f64::from(CHUNK_PAGES * 4096);
        let interval = (ticks_per_s * chunk_bytes / (self.rate_mib_s * 1048576.0)).round();
        if interval >= MAX_INTERVAL {
            return Err(format!("dirty rate {} MiB/s is too low", self.rate_mib_s));
        }
        Ok(Words {
            start: REGION_START as u32,
            chunks: (pages / u64::from(CHUNK_PAGES)) as u32,
            chunk_pages: CHUNK_PAGES,
            interval: interval as u32,
            max_lag: max_lag as u32,
            apic_per_tick,
        })
    }
}

/// Writes the dirtying firmware for `cfg` to `path`: a 64 KiB `-bios` image. Fails on a
/// negative rate, a TSC frequency under 1 MHz, a region past 2.75 GiB, or a rate or catch-up
/// limit that overflows the guest's arithmetic (below about 0.04 MiB/s, above about 1.6 s at
/// 2.6 GHz).
pub fn write_dirtying_firmware(path: &Path, cfg: &DirtyConfig) -> std::io::Result<()> {
    let words = cfg.words().map_err(std::io::Error::other)?;
    std::fs::write(path, image(&words))
}

/// The host's TSC frequency in Hz, measured against the monotonic clock over 50 ms.
pub fn tsc_hz() -> u64 {
    #[cfg(target_arch = "x86_64")]
    {
        let t0 = Instant::now();
        // SAFETY: rdtsc has no preconditions on x86_64.
        let c0 = unsafe { core::arch::x86_64::_rdtsc() };
        std::thread::sleep(Duration::from_millis(50));
        // SAFETY: as above.
        let c1 = unsafe { core::arch::x86_64::_rdtsc() };
        let dt = t0.elapsed().as_secs_f64();
        (c1.wrapping_sub(c0) as f64 / dt) as u64
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = Instant::now();
        1_000_000_000
    }
}

/// What the guest has counted: [`read_counters`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counters {
    /// Passes over the region completed.
    pub passes: u32,
    /// Chunks of [`CHUNK_PAGES`] pages written (and paced), or idle passes of the rate-0 guest.
    pub chunks: u32,
    /// The guest reached protected mode.
    pub started: bool,
}

/// The guest's counters, read with the monitor's `xp` (QMP `human-monitor-command`), which
/// works whether the guest runs or not.
pub async fn read_counters(qmp: &qmigrate_qmp::Qmp) -> Result<Counters, String> {
    let out = qmp
        .execute_raw(
            "human-monitor-command",
            Some(serde_json::json!({
                "command-line": format!("xp /3wx {COUNTER_ADDR:#x}")
            })),
        )
        .await
        .map_err(|e| format!("xp: {e}"))?;
    let text = out.as_str().unwrap_or_default();
    // "0000000000001000: 0x0000002a 0x51444952 0x00000400"
    let mut words = text
        .split_once(':')
        .map(|(_, w)| w)
        .unwrap_or_default()
        .split_whitespace()
        .map(|w| u32::from_str_radix(w.trim_start_matches("0x"), 16));
    match (words.next(), words.next(), words.next()) {
        (Some(Ok(passes)), Some(Ok(magic)), Some(Ok(chunks))) => Ok(Counters {
            passes,
            chunks,
            started: magic == MAGIC,
        }),
        _ => Err(format!("unexpected xp output {text:?}")),
    }
}

/// A byte buffer with labels and 8-bit relative jumps resolved at the end.
struct Asm {
    code: Vec<u8>,
    /// Where the code will be (offset in the blob, to compute nothing but the final place).
    labels: Vec<(&'static str, usize)>,
    /// (position of the rel8 byte, target label)
    fixups: Vec<(usize, &'static str)>,
}

impl Asm {
    fn new() -> Asm {
        Asm {
            code: Vec::new(),
            labels: Vec::new(),
            fixups: Vec::new(),
        }
    }

    /// Appends the bytes of one instruction.
    fn op(&mut self, bytes: &[u8]) {
        self.code.extend_from_slice(bytes);
    }

    /// Where label `name` is, from the start of the code.
    fn position(&self, name: &str) -> usize {
        self.labels
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, p)| *p)
            .unwrap_or_else(|| panic!("no label {name}"))
    }

    fn label(&mut self, name: &'static str) {
        self.labels.push((name, self.code.len()));
    }

    /// A short conditional or unconditional jump: `opcode rel8`.
    fn jump8(&mut self, opcode: u8, target: &'static str) {
        self.code.push(opcode);
        self.fixups.push((self.code.len(), target));
        self.code.push(0);
    }

    fn finish(mut self) -> Vec<u8> {
        for &(at, target) in &self.fixups {
            let to = self.position(target);
            let rel = to as i64 - (at as i64 + 1);
            let rel = i8::try_from(rel).unwrap_or_else(|_| panic!("jump to {target} too far"));
            self.code[at] = rel as u8;
        }
        self.code
    }
}

fn le32(v: u32) -> [u8; 4] {
    v.to_le_bytes()
}

/// An instruction with a 32-bit absolute memory operand: `prefix.. disp32`.
fn with_disp32(prefix: &[u8], disp: u32) -> Vec<u8> {
    let mut v = prefix.to_vec();
    v.extend_from_slice(&le32(disp));
    v
}

/// `opcode modrm disp32 imm32`: an instruction on an absolute address with an immediate.
fn with_disp32_imm32(prefix: &[u8], disp: u32, imm: u32) -> Vec<u8> {
    let mut v = with_disp32(prefix, disp);
    v.extend_from_slice(&le32(imm));
    v
}

/// The 64 KiB image for `w`.
fn image(w: &Words) -> Vec<u8> {
    let mut fw = vec![0u8; 64 * 1024];
    let cfg = |i: u32| ROM_BASE + CONFIG_OFFSET as u32 + 4 * i;
    let (cfg_start, cfg_chunks, cfg_chunk_pages) = (cfg(0), cfg(1), cfg(2));
    let (cfg_interval, cfg_max_lag, cfg_apic_per_tick) = (cfg(3), cfg(4), cfg(5));

    // Reset vector (real mode, CS base 0xFFFF0000, IP 0xFFF0): jmp near to the real-mode code.
    // E9 rel16, relative to the next instruction at 0xFFF3.
    let rel = (REAL_MODE_OFFSET as i32 - 0xFFF3) as u16;
    fw[0xFFF0] = 0xE9;
    fw[0xFFF1..0xFFF3].copy_from_slice(&rel.to_le_bytes());

    // The real-mode part (16-bit code).
    let mut a = Asm::new();
    a.op(&[0xFA]); // cli
                   // o32 lgdt cs:[GDT_PTR_OFFSET]: 66 (32-bit base), 2E (CS: the ROM), 0F 01 /2 with
                   // modrm 00 010 110 (disp16).
    let p = (GDT_PTR_OFFSET as u16).to_le_bytes();
    a.op(&[0x66, 0x2E, 0x0F, 0x01, 0x16, p[0], p[1]]);
    a.op(&[0x0F, 0x20, 0xC0]); // mov eax, cr0
    a.op(&[0x66, 0x83, 0xC8, 0x01]); // or eax, 1 (CR0.PE)
    a.op(&[0x0F, 0x22, 0xC0]); // mov cr0, eax
                               // jmp dword 0x08:(ROM_BASE + PROTECTED_OFFSET): 66 EA ptr16:32, into the flat code segment.
    let mut far = vec![0x66, 0xEA];
    far.extend_from_slice(&le32(ROM_BASE + PROTECTED_OFFSET as u32));
    far.extend_from_slice(&[0x08, 0x00]);
    a.op(&far);
    let real = a.finish();
    assert!(REAL_MODE_OFFSET + real.len() <= GDT_OFFSET);
    fw[REAL_MODE_OFFSET..REAL_MODE_OFFSET + real.len()].copy_from_slice(&real);

    // GDT: null, 0x08 flat code (base 0, limit 4 GiB, 32-bit, execute/read), 0x10 flat data
    // (read/write). The accessed bits are set, so the CPU never writes to the ROM.
    let gdt: [u8; 24] = [
        0, 0, 0, 0, 0, 0, 0, 0, //
        0xFF, 0xFF, 0x00, 0x00, 0x00, 0x9B, 0xCF, 0x00, //
        0xFF, 0xFF, 0x00, 0x00, 0x00, 0x93, 0xCF, 0x00, //
    ];
    fw[GDT_OFFSET..GDT_OFFSET + 24].copy_from_slice(&gdt);
    // The pointers lgdt and lidt load: limit (size - 1), then the 32-bit linear base.
    fw[GDT_PTR_OFFSET..GDT_PTR_OFFSET + 2].copy_from_slice(&23u16.to_le_bytes());
    fw[GDT_PTR_OFFSET + 2..GDT_PTR_OFFSET + 6].copy_from_slice(&le32(ROM_BASE + GDT_OFFSET as u32));
    fw[IDT_PTR_OFFSET..IDT_PTR_OFFSET + 2].copy_from_slice(&(256u16 * 8 - 1).to_le_bytes());
    fw[IDT_PTR_OFFSET + 2..IDT_PTR_OFFSET + 6].copy_from_slice(&le32(ROM_BASE + IDT_OFFSET as u32));

    // The 32-bit part. Registers: esi the pass count, edi the page, ecx the chunks left in
    // the pass, ebx the pages left in the chunk, ebp the chunk's deadline in TSC/256 ticks
    // (which wraps after 2^40 TSC ticks, ~7 min at 2.6 GHz: differences are signed).
    let mut a = Asm::new();
    a.op(&[0x66, 0xB8, 0x10, 0x00]); // mov ax, 0x10
    a.op(&[0x8E, 0xD8]); // mov ds, ax
    a.op(&[0x8E, 0xC0]); // mov es, ax
    a.op(&[0x8E, 0xD0]); // mov ss, ax
    let mut esp = vec![0xBC]; // mov esp, imm32
    esp.extend_from_slice(&le32(STACK_TOP));
    a.op(&esp);
    // lidt [IDT pointer]: 0F 01 /3, modrm 00 011 101 (disp32).
    a.op(&with_disp32(
        &[0x0F, 0x01, 0x1D],
        ROM_BASE + IDT_PTR_OFFSET as u32,
    ));
    // The APIC: software-enabled (SVR bit 8, spurious vector 0xFF), timer divide by 1, timer
    // one-shot on TIMER_VECTOR, unmasked. mov dword [disp32], imm32: C7 /0, modrm 00 000 101.
    a.op(&with_disp32_imm32(&[0xC7, 0x05], APIC_SVR, 0x1FF));
    a.op(&with_disp32_imm32(&[0xC7, 0x05], APIC_DIVIDE, 0xB));
    a.op(&with_disp32_imm32(
        &[0xC7, 0x05],
        APIC_LVT_TIMER,
        TIMER_VECTOR,
    ));
    a.op(&with_disp32_imm32(&[0xC7, 0x05], MAGIC_ADDR as u32, MAGIC)); // mov [MAGIC_ADDR], MAGIC
    a.op(&[0x31, 0xF6]); // xor esi, esi
    a.op(&with_disp32(&[0x89, 0x35], COUNTER_ADDR as u32)); // mov [COUNTER], esi
    a.op(&[0x0F, 0x31]); // rdtsc
    a.op(&[0x0F, 0xAC, 0xD0, 0x08]); // shrd eax, edx, 8 (eax = TSC >> 8)
    a.op(&[0x89, 0xC5]); // mov ebp, eax (the first deadline: now)
    a.label("pass");
    a.op(&with_disp32(&[0x8B, 0x3D], cfg_start)); // mov edi, [start]
    a.op(&with_disp32(&[0x8B, 0x0D], cfg_chunks)); // mov ecx, [chunks]
    a.label("chunk");
    a.op(&with_disp32(&[0x8B, 0x1D], cfg_chunk_pages)); // mov ebx, [chunk_pages]
    a.op(&[0x85, 0xDB]); // test ebx, ebx
    a.jump8(0x74, "pace"); // jz pace (an empty chunk: the rate-0 guest)
    a.label("page");
    a.op(&[0x89, 0x2F]); // mov [edi], ebp (the deadline: new in every chunk)
    a.op(&[0x81, 0xC7, 0x00, 0x10, 0x00, 0x00]); // add edi, 0x1000
    a.op(&[0x4B]); // dec ebx
    a.jump8(0x75, "page"); // jnz page
    a.label("pace");
    a.op(&[0x0F, 0x31]); // rdtsc
    a.op(&[0x0F, 0xAC, 0xD0, 0x08]); // shrd eax, edx, 8
    a.op(&[0x89, 0xC2]); // mov edx, eax (now)
    a.op(&[0x29, 0xE8]); // sub eax, ebp (now - deadline)
    a.jump8(0x79, "due"); // jns due
                          // Sleep until the deadline: APIC ticks = (deadline - now) * apic_per_tick >> 16.
    a.op(&[0xF7, 0xD8]); // neg eax (ticks left)
    a.op(&with_disp32(&[0xF7, 0x25], cfg_apic_per_tick)); // mul dword [apic_per_tick]
    a.op(&[0x0F, 0xAC, 0xD0, 0x10]); // shrd eax, edx, 16
    a.op(&[0x40]); // inc eax (a count of 0 would stop the timer)
    let mut arm = vec![0xA3]; // mov [APIC initial count], eax (arms the one-shot timer)
    arm.extend_from_slice(&le32(APIC_INITIAL_COUNT));
    a.op(&arm);
    a.op(&[0xFB]); // sti (takes effect after the next instruction: no wake-up is missed)
    a.op(&[0xF4]); // hlt (the timer's interrupt goes to "handler", never back here)
    a.op(&[0xFA]); // cli (in case hlt ends some other way)
    a.jump8(0xEB, "pace"); // jmp pace
    a.label("due");
    a.op(&with_disp32(&[0x03, 0x2D], cfg_interval)); // add ebp, [interval] (next deadline)
    a.op(&[0x89, 0xD0]); // mov eax, edx
    a.op(&[0x29, 0xE8]); // sub eax, ebp (lag: now - next deadline)
    a.op(&with_disp32(&[0x3B, 0x05], cfg_max_lag)); // cmp eax, [max_lag]
    a.jump8(0x7E, "paced"); // jle paced (on time, or late by little enough to catch up)
    a.op(&[0x89, 0xD5]); // mov ebp, edx (too late: the schedule restarts from now)
    a.label("paced");
    a.op(&with_disp32(&[0xFF, 0x05], CHUNKS_ADDR as u32)); // inc dword [CHUNKS]
    a.op(&[0x49]); // dec ecx
    a.jump8(0x75, "chunk"); // jnz chunk
    a.op(&[0x46]); // inc esi
    a.op(&with_disp32(&[0x89, 0x35], COUNTER_ADDR as u32)); // mov [COUNTER], esi
    a.jump8(0xEB, "pass"); // jmp pass
                           // The interrupt handler. It never returns with iret: KVM's instruction emulator cannot do
                           // a protected-mode iret, and on this nested host KVM hands it the iret (an emulation
                           // failure stops the guest). Interrupts only come in the hlt above, so the handler drops
                           // the frame and goes back to the deadline check with interrupts off (an interrupt gate).
    a.label("handler");
    a.op(&with_disp32_imm32(&[0xC7, 0x05], APIC_EOI, 0)); // mov dword [EOI], 0
    a.op(&esp); // mov esp, STACK_TOP
    a.jump8(0xEB, "pace"); // jmp pace
    let handler_offset = PROTECTED_OFFSET + a.position("handler");
    let prot = a.finish();
    assert!(PROTECTED_OFFSET + prot.len() <= CONFIG_OFFSET);
    fw[PROTECTED_OFFSET..PROTECTED_OFFSET + prot.len()].copy_from_slice(&prot);

    // IDT: every vector an interrupt gate (present, DPL 0, 32-bit: type 0x8E) to the handler
    // in the code segment, so a stray interrupt cannot triple-fault the guest.
    let handler = ROM_BASE + handler_offset as u32;
    for v in 0..256 {
        let gate = IDT_OFFSET + 8 * v;
        fw[gate..gate + 2].copy_from_slice(&(handler as u16).to_le_bytes());
        fw[gate + 2..gate + 4].copy_from_slice(&0x08u16.to_le_bytes());
        fw[gate + 4] = 0;
        fw[gate + 5] = 0x8E;
        fw[gate + 6..gate + 8].copy_from_slice(&((handler >> 16) as u16).to_le_bytes());
    }

    let words = [
        w.start,
        w.chunks,
        w.chunk_pages,
        w.interval,
        w.max_lag,
        w.apic_per_tick,
    ];
    for (i, v) in words.into_iter().enumerate() {
        fw[CONFIG_OFFSET + 4 * i..CONFIG_OFFSET + 4 * i + 4].copy_from_slice(&le32(v));
    }
    fw
}

#[cfg(test)]
mod tests {
    use super::*;

    const GHZ: u64 = 2_600_000_000;

    fn at(region_mib: u64, rate_mib_s: f64) -> DirtyConfig {
        DirtyConfig {
            region_mib,
            rate_mib_s,
            tsc_hz: GHZ,
            max_lag: Duration::from_millis(5),
        }
    }

    #[test]
    fn words_follow_the_rate() {
        let w = at(64, 16.0).words().expect("valid");
        assert_eq!(w.start, 0x10_0000);
        assert_eq!(w.chunks, 64 * 256 / 16);
        assert_eq!(w.chunk_pages, 16);
        // 64 KiB at 16 MiB/s: every 1/256 s, in TSC/256 ticks.
        assert_eq!(w.interval, (GHZ as f64 / 256.0 / 256.0).round() as u32);
        assert_eq!(w.max_lag, (GHZ as f64 / 256.0 * 0.005).round() as u32);
        // 1 GHz APIC, 2.6 GHz TSC: 256 / 2.6 APIC ticks per TSC/256 tick, in 16.16.
        assert_eq!(w.apic_per_tick, (256.0 / 2.6 * 65536.0_f64).round() as u32);
        let idle = at(64, 0.0).words().expect("valid");
        assert_eq!((idle.chunks, idle.chunk_pages), (1, 0));
        assert_eq!(idle.interval, (GHZ as f64 / 256.0 / 1000.0).round() as u32);
        let max = at(8, f64::INFINITY).words().expect("valid");
        assert_eq!(max.interval, 0);
        for bad in [-1.0, f64::NAN, 0.01] {
            assert!(at(8, bad).words().is_err(), "{bad}");
        }
        assert!(at(4096, 1.0).words().is_err(), "past the PCI hole");
    }

    #[test]
    fn image_has_the_reset_jump_the_tables_and_the_data() {
        let w = at(64, 16.0).words().expect("valid");
        let fw = image(&w);
        assert_eq!(fw.len(), 65536);
        // jmp near 0xF000 from 0xFFF3.
        assert_eq!(&fw[0xFFF0..0xFFF3], &[0xE9, 0x0D, 0xF0]);
        assert_eq!(fw[REAL_MODE_OFFSET], 0xFA);
        // The IDT pointer: 2 KiB at 0xFFFFE800; a gate to the handler in the ROM's last page.
        assert_eq!(
            &fw[IDT_PTR_OFFSET..IDT_PTR_OFFSET + 6],
            &[0xFF, 0x07, 0x00, 0xE8, 0xFF, 0xFF]
        );
        let gate = IDT_OFFSET + 8 * TIMER_VECTOR as usize;
        assert_eq!(fw[gate + 1], 0xF1);
        assert_eq!(
            &fw[gate + 2..gate + 8],
            &[0x08, 0x00, 0x00, 0x8E, 0xFF, 0xFF]
        );
        assert_eq!(
            &fw[CONFIG_OFFSET + 12..CONFIG_OFFSET + 16],
            &w.interval.to_le_bytes()
        );
    }

    /// Writes the image to `$QMIGRATE_FW_DUMP` for a look with
    /// `objdump -D -b binary -m i386 --start-address=0xf100 FILE` (`-M data16,addr16` and
    /// 0xf000 for the real-mode part).
    #[test]
    #[ignore = "a tool, not a test"]
    fn dump_for_objdump() {
        let Some(path) = std::env::var_os("QMIGRATE_FW_DUMP") else {
            return;
        };
        write_dirtying_firmware(Path::new(&path), &at(64, 16.0)).expect("write");
    }
}
