#!/usr/bin/env bash
# Builds the board binary and reports its flash and static RAM use from the ELF section headers.
# Flash: everything loaded from flash (.vector_table, .text, .rodata, and .data's initial values).
# RAM: .data + .bss + .uninit; the stack (the node's buffers live there) comes on top.
# Usage: firmware/board/size.sh   (needs the thumbv7em-none-eabihf target and readelf from binutils)
set -euo pipefail
cd "$(dirname "$0")"
cargo build --release --quiet
elf=target/thumbv7em-none-eabihf/release/cascade-sensor-node
declare -A size=([.vector_table]=0 [.text]=0 [.rodata]=0 [.data]=0 [.bss]=0 [.uninit]=0)
while read -r name _type _addr _off hex _; do
  size[$name]=$((16#$hex))
done < <(readelf -SW "$elf" | sed -n 's/^ *\[ *[0-9]*\] \(\.\)/\1/p')
flash=$((size[.vector_table] + size[.text] + size[.rodata] + size[.data]))
ram=$((size[.data] + size[.bss] + size[.uninit]))
echo "cascade-sensor-node (STM32F411CE, release): flash $flash bytes ($((flash / 1024)) KiB of 512 KiB)," \
  "static RAM $ram bytes (of 128 KiB; the stack comes on top)"
echo "  .vector_table ${size[.vector_table]}  .text ${size[.text]}  .rodata ${size[.rodata]}" \
  " .data ${size[.data]}  .bss ${size[.bss]}"
