import CPhalanxIntrinsics

/// Whether the compile target has 32 wide vector registers (AVX-512: `PHALANX_WIDE_VECTORS`, set
/// from `__AVX512F__`), which the kernels' register blocks are sized by; else 16 registers of 8
/// floats (AVX2). A constant of the build, inlined where it is read, so each branch on it folds away.
@inlinable
public var hasWideRegisters: Bool { PHALANX_WIDE_VECTORS == 1 }

/// Unaligned 16-lane loads and stores: the channel vectors of the kernels. Inputs are rows of
/// `heads * headDim` floats, so a head's channels start at any 4-byte boundary.
@inlinable @inline(__always)
public func load16(_ p: UnsafePointer<Float>) -> SIMD16<Float> {
    UnsafeRawPointer(p).loadUnaligned(as: SIMD16<Float>.self)
}

/// Stores the 16 lanes of `v` at `p`, unaligned.
@inlinable @inline(__always)
public func store16(_ v: SIMD16<Float>, _ p: UnsafeMutablePointer<Float>) {
    UnsafeMutableRawPointer(p).storeBytes(of: v, as: SIMD16<Float>.self)
}

/// Calls `vector(c)` over the channels `0..<headDim` in 16-wide pieces, then `scalar(c)` one by one for
/// the tail, so any head dimension works and 16 (the default) compiles to a single vector step.
@inlinable @inline(__always)
public func forEachChannelChunk(_ headDim: Int, vector: (Int) -> Void, scalar: (Int) -> Void) {
    var c = 0
    while c + 16 <= headDim {
        vector(c)
        c += 16
    }
    while c < headDim {
        scalar(c)
        c += 1
    }
}

/// The sum of the 16 lanes, as a pairwise tree of vector adds (see `phalanx_sum16`).
@inlinable @inline(__always)
public func horizontalSum(_ v: SIMD16<Float>) -> Float { phalanx_sum16(v) }

/// The lane sums of `count` vectors of 16 floats stored one after another at `terms`:
/// `sums[h] = sum_c terms[16 h + c]`. Heads go through transposing trees as wide as the
/// registers hold, 16 at a time with AVX-512 (`phalanx_sums16x16`) and 8 with AVX2
/// (`phalanx_sums8x16`; the 16-wide tree spills there), and the rest one at a time.
@inlinable @inline(__always)
public func sumLanes(of terms: UnsafePointer<Float>, count: Int, into sums: UnsafeMutablePointer<Float>) {
    var h = 0
    if hasWideRegisters {
        while h &+ 16 <= count {
            store16(phalanx_sums16x16(terms + h &* 16), sums + h)
            h &+= 16
        }
    } else {
        while h &+ 8 <= count {
            UnsafeMutableRawPointer(sums + h).storeBytes(of: phalanx_sums8x16(terms + h &* 16), as: SIMD8<Float>.self)
            h &+= 8
        }
    }
    while h < count {
        sums[h] = horizontalSum(load16(terms + h &* 16))
        h &+= 1
    }
}

/// A head width known to the compiler: kernels generic over it are specialised, so that
/// `Sixteen` (the default head dimension) becomes straight-line vector code.
public protocol ChannelWidth {
    /// Channels per head: the width known at compile time, or `runtime` when there is none.
    static func count(_ runtime: Int) -> Int
}

/// Exactly 16 channels per head.
public enum Sixteen: ChannelWidth {
    /// 16, whatever the run-time width.
    @inlinable @inline(__always) public static func count(_: Int) -> Int { 16 }
}

/// Any number of channels, known at run time.
public enum AnyWidth: ChannelWidth {
    /// The run-time width, unchanged.
    @inlinable @inline(__always) public static func count(_ runtime: Int) -> Int { runtime }
}

/// `sum_c a[c] * b[c]`, 16 lanes at a time with 4 independent accumulators.
@inlinable
public func dotProduct(_ a: UnsafePointer<Float>, _ b: UnsafePointer<Float>, count: Int) -> Float {
    var acc0 = SIMD16<Float>.zero, acc1 = SIMD16<Float>.zero
    var c = 0
    while c + 32 <= count {
        acc0 = acc0.addingProduct(load16(a + c), load16(b + c))
        acc1 = acc1.addingProduct(load16(a + c + 16), load16(b + c + 16))
        c += 32
    }
    while c + 16 <= count {
        acc0 = acc0.addingProduct(load16(a + c), load16(b + c))
        c += 16
    }
    var total = horizontalSum(acc0 + acc1)
    while c < count {
        total += a[c] * b[c]
        c += 1
    }
    return total
}

/// `y[c] += alpha * x[c]`.
@inlinable
public func addScaled(_ x: UnsafePointer<Float>, _ alpha: Float, into y: UnsafeMutablePointer<Float>, count: Int) {
    var c = 0
    while c + 16 <= count {
        store16(load16(y + c).addingProduct(SIMD16(repeating: alpha), load16(x + c)), y + c)
        c += 16
    }
    while c < count {
        y[c] += alpha * x[c]
        c += 1
    }
}
