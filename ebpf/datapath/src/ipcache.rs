//! Address -> identity (see `myelin_common::ipcache`).

use aya_ebpf::{
    btf_maps::{LpmTrie, lpm_trie::Key},
    macros::btf_map,
};
use myelin_common::{IpcacheEntry, Ipv4Key, maps::DEFAULT_MAX_IPCACHE};

#[btf_map(name = "ipcache")]
static IPCACHE: LpmTrie<Ipv4Key, IpcacheEntry, { DEFAULT_MAX_IPCACHE as usize }> = LpmTrie::new();

/// The identities of `addr`; `WORLD` when no prefix covers it.
#[inline(always)]
pub fn lookup(addr: [u8; 4]) -> IpcacheEntry {
    IPCACHE
        .get(&Key::new(32, Ipv4Key { addr }))
        .copied()
        .unwrap_or(IpcacheEntry::WORLD)
}
