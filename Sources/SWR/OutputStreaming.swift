import CPhalanxIntrinsics
import PhalanxRuntime

/// How a forward operator writes its output `y`: with non-temporal stores when the output is
/// far larger than the caches, ordinary stores otherwise.
///
/// An ordinary store first reads the line it writes (read for ownership): a write stream costs
/// a read stream too, a third of a forward's traffic (it reads `u` and `a`, writes `y`). A copy
/// with non-temporal stores does not pay it, and on the GPU host's Xeon the forwards measured
/// 60-68% of such a copy at 4 x 65536 rows of 16 heads x 16. Below `threshold` the output is
/// written with ordinary stores, so that the next pass (the layer's gating) finds it in the caches.
struct OutputStreaming {
    /// Outputs of at least this many bytes are streamed: above the last-level caches of the
    /// machines measured (32 MiB on the AMD EPYC development machine), and above a 32K-token,
    /// 256-wide Phalanx layer's 32 MiB, which the layer reads again right after.
    static let threshold = 64 << 20

    /// Whether the stores stream.
    private(set) var streams: Bool

    /// Ordinary stores.
    static let ordinary = OutputStreaming(streams: false)

    private init(streams: Bool) { self.streams = streams }

    /// For an output `y` of `count` floats in vectors of `headDim`: streams when the vectors are
    /// whole lines (see `init(wholeLines:headDim:)`) and the output is at least `threshold` bytes.
    init(_ y: UnsafeMutablePointer<Float>, count: Int, headDim: Int) {
        self.init(wholeLines: y, headDim: headDim)
        streams = streams && count * MemoryLayout<Float>.stride >= Self.threshold
    }

    /// Streams whenever every vector of `headDim` floats starts on a 64-byte line (`headDim` a
    /// multiple of 16, `y` aligned), whatever the size: for outputs written once and not read
    /// again by the pass that writes them (the backward passes' `du`).
    init(wholeLines y: UnsafeMutablePointer<Float>, headDim: Int) {
        streams = headDim % 16 == 0 && Int(bitPattern: y) % 64 == 0
    }

    /// Stores the 16 floats of `v` at `p` (64-byte aligned when streaming).
    @inline(__always)
    func store(_ v: SIMD16<Float>, _ p: UnsafeMutablePointer<Float>) {
        if streams { phalanx_stream16(p, v) } else { store16(v, p) }
    }

    /// Orders this thread's streamed stores before what follows (the pool's hand-back).
    @inline(__always)
    func finish() { if streams { phalanx_stream_fence() } }
}
