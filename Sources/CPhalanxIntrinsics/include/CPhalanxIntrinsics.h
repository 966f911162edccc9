// Processor hints that Swift has no spelling for. Header-only: every function inlines.
#ifndef CPHALANX_INTRINSICS_H
#define CPHALANX_INTRINSICS_H

/// Tells the core that the caller is in a spin-wait loop (x86 `pause`, Arm `yield`), which
/// frees resources for the sibling hyper-thread and saves power while a worker waits.
static inline __attribute__((always_inline)) void phalanx_spin_pause(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

#endif
