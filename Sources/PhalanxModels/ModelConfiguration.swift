import Foundation
import PhalanxLayers
import PhalanxRuntime
import SWR

/// The kind of token mixer of a block, as written in a layer pattern.
public enum MixerKind: Character, Codable, Sendable, CaseIterable {
    /// Phalanx: jagged-window recurrence with gated projections.
    case phalanx = "P"
    /// Sliding-window causal attention (window `ModelConfiguration.window`), with RoPE.
    case slidingWindow = "S"
    /// Full causal attention with RoPE.
    case attention = "A"
}

/// Everything that defines a hybrid language model's shape; stored inside every checkpoint.
///
/// A model is: token embedding; `depth` blocks, each `x + mixer(norm(x))` then
/// `x + mlp(norm(x))`; a final norm; an output head (tied to the embedding by default). The mixer
/// of block `i` is `pattern[i % pattern.count]` (`PPPA` tiled over depth 8 gives `PPPAPPPA`).
public struct ModelConfiguration: Codable, Hashable, Sendable {
    /// Token ids are `0 ..< vocabulary` (rows of the embedding and of the head); 256 for bytes.
    /// At least 2, at most `Int32.max`.
    public var vocabulary: Int
    /// Width of the residual stream: a positive multiple of `PhalanxLayer.headDim` (16).
    public var dim: Int
    /// Number of blocks, at least 1.
    public var depth: Int
    /// Mixer kinds as `MixerKind` characters (`P`, `S`, `A`), tiled over the blocks: block `i`
    /// uses `pattern[i % pattern.count]`. Not empty.
    public var pattern: String
    /// Query heads of each attention block (`S` and `A`); a positive multiple of
    /// `attentionKVHeads`.
    public var attentionHeads: Int
    /// Key/value heads of each attention block (grouped-query attention when fewer than
    /// `attentionHeads`); at least 1.
    public var attentionKVHeads: Int
    /// Channels per attention head: even (rotary pairs) and at least 2. `attentionHeads *
    /// attentionHeadDim == dim` is usual, not required.
    public var attentionHeadDim: Int
    /// Sliding-window attention's window (positions seen, the current one included).
    public var window: Int
    /// Hidden width of the SwiGLU MLP.
    public var mlpHidden: Int
    /// Key/value heads of the Phalanx layers (of `dim / PhalanxLayer.headDim` heads).
    public var phalanxKVHeads: Int
    /// Positions per block of the Phalanx layers' jagged window, `l` (the paper's 16).
    public var blockLength: Int
    /// Blocks each position of a Phalanx layer sees, `k`: 1 (its own) or 2 (its own and the
    /// previous one, the paper's choice).
    public var blocksSeen: Int
    /// Scale on the Phalanx gate sigmoid (1: plain sigmoid).
    public var gateScale: Float
    /// Whether the output head reuses the embedding `[vocabulary, dim]` (true) or has its own
    /// `lm_head.weight`.
    public var tiedEmbedding: Bool
    /// Frequency base `b` of the rotary position embedding in the attention blocks (position `p`
    /// turns channel pair `i` by `p * b^(-2i / attentionHeadDim)`); finite and above 1.
    public var ropeBase: Float

    /// A configuration; the optional sizes default to `attentionKVHeads = attentionHeads`,
    /// `attentionHeadDim = dim / attentionHeads` and `phalanxKVHeads = dim / PhalanxLayer.headDim`
    /// (one per head), and the jagged window to the paper's `blockLength` 16, `blocksSeen` 2.
    /// Nothing is checked here: call `validate()`.
    public init(vocabulary: Int = 256, dim: Int, depth: Int, pattern: String, attentionHeads: Int,
                attentionKVHeads: Int? = nil, attentionHeadDim: Int? = nil, window: Int = 512,
                mlpHidden: Int, phalanxKVHeads: Int? = nil, blockLength: Int = JaggedWindow.standardBlockLength,
                blocksSeen: Int = JaggedWindow.standardBlocksSeen, gateScale: Float = 1, tiedEmbedding: Bool = true,
                ropeBase: Float = 10000) {
        self.vocabulary = vocabulary
        self.dim = dim
        self.depth = depth
        self.pattern = pattern
        self.attentionHeads = attentionHeads
        self.attentionKVHeads = attentionKVHeads ?? attentionHeads
        self.attentionHeadDim = attentionHeadDim ?? dim / max(attentionHeads, 1)
        self.window = window
        self.mlpHidden = mlpHidden
        self.phalanxKVHeads = phalanxKVHeads ?? dim / PhalanxLayer.headDim
        self.blockLength = blockLength
        self.blocksSeen = blocksSeen
        self.gateScale = gateScale
        self.tiedEmbedding = tiedEmbedding
        self.ropeBase = ropeBase
    }

    /// The mixer of each block.
    public var mixers: [MixerKind] {
        let kinds = pattern.compactMap(MixerKind.init(rawValue:))
        return (0..<depth).map { kinds[$0 % kinds.count] }
    }

    /// Checks every constraint, with a message naming the field and what is allowed, including
    /// that the weights (with their gradients) fit this machine's memory.
    ///
    /// - Throws: `ConfigurationError` for the first field out of range, with `field` set.
    public func validate() throws {
        func fail(_ field: String, _ message: String) -> ConfigurationError { ConfigurationError(message, field: field) }
        guard vocabulary >= 2 else { throw fail("vocabulary", "vocabulary must be at least 2, got \(vocabulary)") }
        let D = PhalanxLayer.headDim
        guard dim >= D && dim % D == 0 else { throw fail("dim", "dim must be a positive multiple of \(D) (Phalanx heads of \(D)), got \(dim)") }
        guard depth >= 1 else { throw fail("depth", "depth must be at least 1, got \(depth)") }
        guard !pattern.isEmpty, pattern.allSatisfy({ MixerKind(rawValue: $0) != nil }) else {
            throw fail("pattern", "pattern must be a non-empty string of P (Phalanx), S (sliding-window attention) and A (attention), got '\(pattern)'")
        }
        guard attentionHeads >= 1, attentionKVHeads >= 1, attentionHeads % attentionKVHeads == 0 else {
            throw fail("attentionHeads", "attention heads (\(attentionHeads)) must be a positive multiple of its key/value heads (\(attentionKVHeads))")
        }
        guard attentionHeadDim >= 2 && attentionHeadDim % 2 == 0 else {
            throw fail("attentionHeadDim", "attention head width must be even (rotary embedding pairs), got \(attentionHeadDim)")
        }
        guard window >= 1 else { throw fail("window", "window must be at least 1, got \(window)") }
        guard mlpHidden >= 1 else { throw fail("mlpHidden", "mlpHidden must be at least 1, got \(mlpHidden)") }
        guard phalanxKVHeads >= 1, (dim / D) % phalanxKVHeads == 0 else {
            throw fail("phalanxKVHeads", "Phalanx key/value heads must divide the \(dim / D) heads, got \(phalanxKVHeads)")
        }
        guard blockLength >= 1 else { throw fail("blockLength", "blockLength must be at least 1, got \(blockLength)") }
        guard blocksSeen == 1 || blocksSeen == 2 else { throw fail("blocksSeen", "blocksSeen (k) must be 1 or 2, got \(blocksSeen)") }
        guard gateScale > 0 && gateScale <= 1 else { throw fail("gateScale", "gateScale must be in (0, 1], got \(gateScale)") }
        guard ropeBase > 1 && ropeBase.isFinite else { throw fail("ropeBase", "ropeBase must be finite and above 1, got \(ropeBase)") }
        guard vocabulary <= Int(Int32.max) else { throw fail("vocabulary", "vocabulary must fit Int32 token ids (at most \(Int32.max)), got \(vocabulary)") }
        guard window <= Self.maximumWindow else { throw fail("window", "window must be at most \(Self.maximumWindow), got \(window)") }
        guard let count = parameterCount else {
            throw fail("depth", "dim \(dim), depth \(depth), vocabulary \(vocabulary), mlpHidden \(mlpHidden) and the attention sizes describe more parameters than an Int counts")
        }
        let bytes = MemoryBudget.product(8, count)
        guard MemoryBudget.fits(bytes) else {
            throw fail("depth", "\(count) parameters need \(MemoryBudget.describe(bytes)) (weights and gradients), more than this machine's \(MemoryBudget.describe(MemoryBudget.physicalBytes)) of memory")
        }
    }

    /// How many blocks of each mixer kind the pattern, tiled over `depth`, gives (computed
    /// without listing the blocks, so that a hostile depth costs nothing).
    public var blockCounts: [MixerKind: Int] {
        let kinds = pattern.compactMap(MixerKind.init(rawValue:))
        guard !kinds.isEmpty, depth > 0 else { return [:] }
        var counts: [MixerKind: Int] = [:]
        for (i, kind) in kinds.enumerated() {
            counts[kind, default: 0] += depth / kinds.count + (i < depth % kinds.count ? 1 : 0)
        }
        return counts
    }

    /// The longest sliding window accepted (2^24 positions): far beyond any context a model is
    /// trained at, and small enough that a decode ring of this many positions can be allocated.
    public static let maximumWindow = 1 << 24

    /// The number of weights a model of this configuration holds, computed without building it
    /// (nil when it overflows `Int`); equal to `LanguageModel.parameterCount` (a test checks it):
    ///
    ///     vocabulary * dim (embedding)  +  dim (final norm)  +  vocabulary * dim (untied head)
    ///     + per block: 2 dim (norms) + 3 dim mlpHidden (SwiGLU) + mixer, where the mixer is
    ///         attention: 2 dim heads headDim + 2 dim kvHeads headDim (q, o; k, v)
    ///         Phalanx:   dim P + (H + 2 D KVH) + dim^2,  P = 2 D KVH + D H + H (`PhalanxLayer.Columns`),
    ///                    D = PhalanxLayer.headDim, H = dim / D, KVH = phalanxKVHeads
    public var parameterCount: Int? {
        typealias M = MemoryBudget
        let D = PhalanxLayer.headDim, h = dim / D, kv = phalanxKVHeads
        let attention = M.sum(M.product(2, dim, attentionHeads, attentionHeadDim), M.product(2, dim, attentionKVHeads, attentionHeadDim))
        let phalanxWidth = M.sum(h, M.product(2 * D, kv), M.product(D, h))
        let phalanx = M.sum(phalanxWidth.flatMap { M.product(dim, $0) }, M.sum(h, M.product(2 * D, kv)), M.product(dim, dim))
        var total = M.sum(M.product(vocabulary, dim, tiedEmbedding ? 1 : 2), dim)
        for (kind, blocks) in blockCounts {
            let block = M.sum(M.product(2, dim), M.product(3, dim, mlpHidden), kind == .phalanx ? phalanx : attention)
            total = M.sum(total, block.flatMap { M.product(blocks, $0) })
        }
        return total
    }

    /// Rough bytes one training step needs at `batch` x `length` tokens: weights, gradients and
    /// the two AdamW moments (16 bytes per parameter), plus the activations kept for backward
    /// (per token: the logits and their gradient, and about 12 dim + 3 mlpHidden floats per
    /// block). Nil when it overflows `Int`. Used to refuse a run before it allocates.
    public func trainingBytes(batch: Int, length: Int) -> Int? {
        typealias M = MemoryBudget
        let perToken = M.sum(M.product(2, vocabulary), M.product(depth, M.sum(M.product(12, dim), M.product(3, mlpHidden)) ?? -1))
        return M.sum(parameterCount.flatMap { M.product(16, $0) },
                     M.product(4, batch, length, perToken ?? -1))
    }

    /// Throws unless scoring or decoding `batch` sequences of `positions` tokens fits where it
    /// runs (see `inferenceBytes`): this machine's memory on the CPU, the device's plannable
    /// memory on a GPU (`CUDADevice.plannableBytes`). The error's field is `batch`.
    ///
    /// - Throws: `ConfigurationError` with the bytes needed and the bytes available.
    public func checkInference(batch: Int, positions: Int, on placement: Placement = .cpu) throws {
        typealias M = MemoryBudget
        guard let gpu = placement.device.cuda else {
            let bytes = inferenceBytes(batch: batch, positions: positions)
            guard M.fits(bytes) else {
                throw ConfigurationError("\(batch) sequences of \(positions) positions need about \(M.describe(bytes)) with this model, more than this machine's \(M.describe(M.physicalBytes))", field: "batch")
            }
            return
        }
        let compute = placement.compute
        let bytes = inferenceBytes(batch: batch, positions: positions, weightBytes: 8 + (compute == .bfloat16 ? 2 : 0),
                                   activationBytes: compute.byteCount)
        guard let bytes, bytes <= gpu.plannableBytes else {
            throw ConfigurationError("\(batch) sequences of \(positions) positions need about \(M.describe(bytes)) of device memory with this model in \(compute), more than \(gpu.plannableDescription)", field: "batch")
        }
    }

    /// Rough bytes to score or decode `batch` sequences of `positions` tokens: weights
    /// (`weightBytes` each: 4 for the host's float32; on a GPU 8, the gradients moving with the
    /// weights, and 10 with bfloat16 compute copies), the
    /// logits of one pass, every attention block's key/value cache (full attention keeps every
    /// position, sliding-window attention a ring of `window` positions plus a margin) and the
    /// activations of one pass, `activationBytes` per number. Nil when it overflows `Int`.
    public func inferenceBytes(batch: Int, positions: Int, weightBytes: Int = 4, activationBytes: Int = 4) -> Int? {
        typealias M = MemoryBudget
        let kvRow = M.product(2 * activationBytes, batch, attentionKVHeads, attentionHeadDim)
        var total = M.sum(parameterCount.flatMap { M.product(weightBytes, $0) }, M.product(activationBytes, batch, positions, vocabulary),
                          M.product(activationBytes, batch, positions, M.sum(M.product(12, dim), M.product(3, mlpHidden)) ?? -1))
        for (kind, blocks) in blockCounts where kind != .phalanx {
            let kept = kind == .attention ? positions : M.sum(window, 1024)
            total = M.sum(total, kept.flatMap { k in kvRow.flatMap { M.product(blocks, k, $0) } })
        }
        return total
    }
}

extension ModelConfiguration {
    private enum CodingKeys: String, CodingKey {
        case vocabulary, dim, depth, pattern, attentionHeads, attentionKVHeads, attentionHeadDim, window, mlpHidden
        case phalanxKVHeads, blockLength, blocksSeen, gateScale, tiedEmbedding, ropeBase
    }

    /// Decodes a configuration; `blockLength` and `blocksSeen`, absent from checkpoints written
    /// before they were configurable, default to the paper's 16 and 2 that those models used.
    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        vocabulary = try c.decode(Int.self, forKey: .vocabulary)
        dim = try c.decode(Int.self, forKey: .dim)
        depth = try c.decode(Int.self, forKey: .depth)
        pattern = try c.decode(String.self, forKey: .pattern)
        attentionHeads = try c.decode(Int.self, forKey: .attentionHeads)
        attentionKVHeads = try c.decode(Int.self, forKey: .attentionKVHeads)
        attentionHeadDim = try c.decode(Int.self, forKey: .attentionHeadDim)
        window = try c.decode(Int.self, forKey: .window)
        mlpHidden = try c.decode(Int.self, forKey: .mlpHidden)
        phalanxKVHeads = try c.decode(Int.self, forKey: .phalanxKVHeads)
        blockLength = try c.decodeIfPresent(Int.self, forKey: .blockLength) ?? JaggedWindow.standardBlockLength
        blocksSeen = try c.decodeIfPresent(Int.self, forKey: .blocksSeen) ?? JaggedWindow.standardBlocksSeen
        gateScale = try c.decode(Float.self, forKey: .gateScale)
        tiedEmbedding = try c.decode(Bool.self, forKey: .tiedEmbedding)
        ropeBase = try c.decode(Float.self, forKey: .ropeBase)
    }
}

/// A model configuration value out of range; the message names the field and what is allowed.
public struct ConfigurationError: Error, CustomStringConvertible, Equatable {
    /// What is out of range and what is allowed.
    public let description: String
    /// The `ModelConfiguration` property at fault, when one is (for the CLI to name its flag).
    public let field: String?
    /// An error saying `description`, about `field` when one is given.
    public init(_ description: String, field: String? = nil) {
        self.description = description
        self.field = field
    }
}

extension ModelConfiguration {
    /// Named presets: `transformer` (all `A`), `swa-hybrid` (`SSSA`), `phalanx-hybrid` (`PPPA`),
    /// each `-tiny` or `-small`. Within a size the three have equal parameter counts (to 0.5%):
    /// attention and Phalanx both cost `4 dim^2` (plus Phalanx's small gate projections).
    ///
    /// - small: dim 256, depth 4, 4 attention heads of 64, SwiGLU 688, byte vocabulary, tied
    ///   head: about 3.2M parameters.
    /// - tiny: dim 128, depth 4, 2 heads of 64, SwiGLU 344: about 0.8M parameters.
    ///
    /// GPU sizes (the shapes of the paper's and PyTorch's GPU comparisons; SwiGLU near 8/3 dim,
    /// rounded to a multiple of 64):
    /// - medium: dim 1024, depth 12, 8 attention heads of 128, SwiGLU 2752: about 152M parameters.
    /// - large: dim 2048, depth 8, 16 heads of 128, SwiGLU 5440: about 402M parameters.
    ///
    /// - Throws: `ConfigurationError` listing `presetNames` when `name` is not one of them.
    public static func preset(_ name: String) throws -> ModelConfiguration {
        let parts = name.split(separator: "-")
        guard parts.count >= 2, let size = parts.last else { throw unknownPreset(name) }
        let family = parts.dropLast().joined(separator: "-")
        let pattern: String
        switch family {
        case "transformer": pattern = "A"
        case "swa-hybrid": pattern = "SSSA"
        case "phalanx-hybrid": pattern = "PPPA"
        default: throw unknownPreset(name)
        }
        switch size {
        case "tiny": return ModelConfiguration(dim: 128, depth: 4, pattern: pattern, attentionHeads: 2, mlpHidden: 344)
        case "small": return ModelConfiguration(dim: 256, depth: 4, pattern: pattern, attentionHeads: 4, mlpHidden: 688)
        case "medium": return ModelConfiguration(dim: 1024, depth: 12, pattern: pattern, attentionHeads: 8, mlpHidden: 2752)
        case "large": return ModelConfiguration(dim: 2048, depth: 8, pattern: pattern, attentionHeads: 16, mlpHidden: 5440)
        default: throw unknownPreset(name)
        }
    }

    /// The names `preset(_:)` accepts: each family with `-tiny`, `-small` (CPU sizes), `-medium`
    /// and `-large` (GPU sizes).
    public static let presetNames = ["transformer", "swa-hybrid", "phalanx-hybrid"].flatMap { f in
        ["tiny", "small", "medium", "large"].map { "\(f)-\($0)" }
    }

    private static func unknownPreset(_ name: String) -> ConfigurationError {
        ConfigurationError("unknown preset '\(name)'; choose one of \(presetNames.joined(separator: ", "))")
    }
}
