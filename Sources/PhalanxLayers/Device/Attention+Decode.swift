import PhalanxCUDA
import PhalanxRuntime

/// The keys and values of a `KeyValueCache` on a GPU, in pages that never move.
///
/// A page holds `slots` positions of every sequence, keys and values apart, each
/// `[batch, kvHeads, slots, headDim]` in the activations' format. Full attention adds pages of
/// `pageSlots` positions as the longest sequence grows (position `p` in page `p / slots`, slot
/// `p % slots`): the cache grows without ever copying itself. Sliding-window attention keeps one
/// page of `window + KeyValueCache.chunk` slots as a ring (position `p` at slot `p % slots`).
/// The kernels find the pages through a table of their addresses on the device, uploaded again
/// only when a page is added.
final class DeviceKeyValuePages: @unchecked Sendable {
    /// Positions per page of a full-attention cache.
    static let pageSlots = 1024

    let gpu: CUDADevice
    let format: NumberFormat
    let batch: Int, kvHeads: Int, headDim: Int
    /// Positions per page; whether the one page is a ring.
    let slots: Int, ring: Bool
    private(set) var keyPages: [DeviceBuffer] = [], valuePages: [DeviceBuffer] = []
    private var table: DeviceBuffer?

    /// An empty cache; `ring` is the ring's slot count for a sliding window, nil for full attention.
    init(on gpu: CUDADevice, format: NumberFormat, batch: Int, kvHeads: Int, headDim: Int, ring: Int?) {
        (self.gpu, self.format, self.batch, self.kvHeads, self.headDim) = (gpu, format, batch, kvHeads, headDim)
        (slots, self.ring) = (ring ?? Self.pageSlots, ring != nil)
    }

    /// The parts' sequences in order, each part's pages copied into the joined pages (one copy
    /// per part and page); `length` is the longest sequence of each part.
    convenience init(stacking parts: [(pages: DeviceKeyValuePages, length: Int)]) {
        let first = parts[0].pages
        self.init(on: first.gpu, format: first.format, batch: parts.reduce(0) { $0 + $1.pages.batch }, kvHeads: first.kvHeads,
                  headDim: first.headDim, ring: first.ring ? first.slots : nil)
        ensure(positions: parts.map(\.length).max() ?? 0)
        let sequenceBytes = kvHeads * slots * headDim * format.byteCount
        var sequence = 0
        for (part, _) in parts {
            for (page, (keys, values)) in zip(part.keyPages, part.valuePages).enumerated() where page < keyPages.count {
                gpu.perform {
                    for (target, source) in [(keyPages[page], keys), (valuePages[page], values)] {
                        try DeviceBuffer(viewing: target, byteOffset: sequence * sequenceBytes, byteCount: source.byteCount)
                            .copy(from: source)
                    }
                }
            }
            sequence += part.batch
        }
    }

    /// Bytes of the pages held.
    var byteCount: Int { (keyPages.count + valuePages.count) * pageBytes }

    private var pageBytes: Int { batch * kvHeads * slots * headDim * format.byteCount }

    /// Adds pages until positions `0..<positions` of every sequence have a slot (a ring: its one
    /// page), and queues the table's upload when it changed (in stream order, without waiting: a
    /// prefill queues its layers back to back).
    func ensure(positions: Int) {
        let needed = ring ? 1 : (positions + slots - 1) / slots
        guard keyPages.count < needed else { return }
        gpu.perform {
            // The new pages of keys and of values as views of one allocation each: a prefill of
            // 32K positions allocates twice, not 64 times.
            let added = needed - keyPages.count
            func pages() throws -> [DeviceBuffer] {
                let block = try DeviceBuffer(context: gpu.context, byteCount: added * pageBytes)
                return (0..<added).map { DeviceBuffer(viewing: block, byteOffset: $0 * pageBytes, byteCount: pageBytes) }
            }
            keyPages += try pages()
            valuePages += try pages()
            let addresses = keyPages.map(\.address) + valuePages.map(\.address)
            let table = try DeviceBuffer(context: gpu.context, byteCount: addresses.count * 8)
            try table.enqueueUpload(addresses)
            self.table = table
        }
    }

    /// The pages as the kernels take them (after `ensure`).
    var kernelPages: CUDADecodeAttention.Pages? {
        table.map { .init(table: $0, count: keyPages.count, slots: slots, ring: ring, batch: batch, kvHeads: kvHeads) }
    }
}

/// Attention decoding on a CUDA device (`CUDADecodeAttention`):
///
///     q, k, v = x Wq^T, x Wk^T, x Wv^T                 cuBLAS
///     rotate q, k at each sequence's positions         one kernel for both
///     a = attend(q; cache below the start, the chunk's own k, v from it)   flash-decoding
///     write k, v into the cache                        one kernel
///     y = a Wo^T                                        cuBLAS
///
/// A prefill from empty sequences is the parallel forward (the tiled kernel), whose rotated keys
/// and values then fill the cache.
extension Attention {
    /// Continues every sequence of the device `state` by the positions of `x` `[batch, n, dim]`
    /// (queued; failures are recorded on the device).
    func infer(_ x: Tensor, state: inout KeyValueCache, on gpu: CUDADevice) -> Tensor {
        guard let pages = state.devicePages, x.device.isSame(as: .cuda(pages.gpu)) else {
            fatalError("Attention.infer: x is on \(x.device), the cache is not (make it with makeState after moving the layer)")
        }
        require(x.format == pages.format, "Attention.infer: x is \(x.format), the cache holds \(pages.format)")
        let (batch, n) = (x.shape[0], x.shape[1])
        let starts = state.lengths, end = (starts.max() ?? 0) + n
        guard batch * n > 0 else { return Tensor(uninitialized: [batch, n, dim], like: x) }
        pages.ensure(positions: end)
        let startBuffer = gpu.value { () -> DeviceBuffer in
            let buffer = try DeviceBuffer(context: gpu.context, byteCount: batch * 4)
            try buffer.enqueueUpload(starts.map { Int32($0) })
            return buffer
        }
        func kernels() throws -> CUDADecodeAttention { try CUDADecodeAttention.on(gpu, storage: x.format, headDim: headDim) }
        if n > 1 && starts.allSatisfy({ $0 == 0 }) {
            let (y, cache) = forward(x)
            gpu.perform {
                guard let startBuffer, let kernelPages = pages.kernelPages else { return }
                try kernels().append(keys: cache.key.deviceBuffer, values: cache.value.deviceBuffer, starts: startBuffer,
                                     pages: kernelPages, n: n)
            }
            state.advance(by: n)
            return y
        }
        let q = qProj.forward(x), k = kProj.forward(x), v = vProj.forward(x)
        let attended = Tensor(uninitialized: [batch, n, heads * headDim], like: q)
        let table = rotary.flatMap { $0.deviceTable(upTo: end, on: gpu) }
        let scale = kernel.scale(for: AttentionLayout(batch: batch, length: 1, heads: heads, kvHeads: kvHeads, headDim: headDim))
        let longestSpan = min(window ?? end, end)
        gpu.perform {
            guard let startBuffer, let kernelPages = pages.kernelPages else { return }
            let kernels = try kernels()
            if let table {
                try kernels.rotate(queries: q.deviceBuffer, keys: k.deviceBuffer, starts: startBuffer, cosines: table.cosines,
                                   sines: table.sines, batch: batch, n: n, heads: heads, kvHeads: kvHeads)
            }
            try kernels.attend(queries: q.deviceBuffer, keys: k.deviceBuffer, values: v.deviceBuffer, outputs: attended.deviceBuffer,
                               starts: startBuffer, pages: kernelPages, n: n, heads: heads, window: window, longestSpan: longestSpan,
                               scale: scale)
            try kernels.append(keys: k.deviceBuffer, values: v.deviceBuffer, starts: startBuffer, pages: kernelPages, n: n)
        }
        state.advance(by: n)
        return oProj.forward(attended)
    }
}
