import Foundation
import PhalanxLayers
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
    public var vocabulary: Int
    public var dim: Int
    public var depth: Int
    public var pattern: String
    /// Attention heads and their width (`attentionHeads * attentionHeadDim == dim` is usual).
    public var attentionHeads: Int
    public var attentionKVHeads: Int
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
    public var tiedEmbedding: Bool
    public var ropeBase: Float

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

    /// Checks every constraint, with a message naming the field and what is allowed.
    public func validate() throws {
        func fail(_ message: String) -> ConfigurationError { ConfigurationError(message) }
        guard vocabulary >= 2 else { throw fail("vocabulary must be at least 2, got \(vocabulary)") }
        let D = PhalanxLayer.headDim
        guard dim >= D && dim % D == 0 else { throw fail("dim must be a positive multiple of \(D) (Phalanx heads of \(D)), got \(dim)") }
        guard depth >= 1 else { throw fail("depth must be at least 1, got \(depth)") }
        guard !pattern.isEmpty, pattern.allSatisfy({ MixerKind(rawValue: $0) != nil }) else {
            throw fail("pattern must be a non-empty string of P (Phalanx), S (sliding-window attention) and A (attention), got '\(pattern)'")
        }
        guard attentionHeads >= 1, attentionKVHeads >= 1, attentionHeads % attentionKVHeads == 0 else {
            throw fail("attention heads (\(attentionHeads)) must be a positive multiple of its key/value heads (\(attentionKVHeads))")
        }
        guard attentionHeadDim >= 2 && attentionHeadDim % 2 == 0 else {
            throw fail("attention head width must be even (rotary embedding pairs), got \(attentionHeadDim)")
        }
        guard window >= 1 else { throw fail("window must be at least 1, got \(window)") }
        guard mlpHidden >= 1 else { throw fail("mlpHidden must be at least 1, got \(mlpHidden)") }
        guard phalanxKVHeads >= 1, (dim / D) % phalanxKVHeads == 0 else {
            throw fail("Phalanx key/value heads must divide the \(dim / D) heads, got \(phalanxKVHeads)")
        }
        guard blockLength >= 1 else { throw fail("blockLength must be at least 1, got \(blockLength)") }
        guard blocksSeen == 1 || blocksSeen == 2 else { throw fail("blocksSeen (k) must be 1 or 2, got \(blocksSeen)") }
        guard gateScale > 0 && gateScale <= 1 else { throw fail("gateScale must be in (0, 1], got \(gateScale)") }
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
    public let description: String
    public init(_ description: String) { self.description = description }
}

extension ModelConfiguration {
    /// Named presets: `transformer` (all `A`), `swa-hybrid` (`SSSA`), `phalanx-hybrid` (`PPPA`),
    /// each `-tiny` or `-small`. Within a size the three have equal parameter counts (to 0.5%):
    /// attention and Phalanx both cost `4 dim^2` (plus Phalanx's small gate projections).
    ///
    /// - small: dim 256, depth 4, 4 attention heads of 64, SwiGLU 688, byte vocabulary, tied
    ///   head: about 3.2M parameters.
    /// - tiny: dim 128, depth 4, 2 heads of 64, SwiGLU 344: about 0.8M parameters.
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
        default: throw unknownPreset(name)
        }
    }

    public static let presetNames = ["transformer", "swa-hybrid", "phalanx-hybrid"].flatMap { f in ["tiny", "small"].map { "\(f)-\($0)" } }

    private static func unknownPreset(_ name: String) -> ConfigurationError {
        ConfigurationError("unknown preset '\(name)'; choose one of \(presetNames.joined(separator: ", "))")
    }
}
