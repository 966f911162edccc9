import Foundation
import PhalanxCUDA
import PhalanxLayers
import SWR
import PhalanxRuntime

/// A mixer paired with its decode state: what `LanguageModel.DecodeState` holds per block. The
/// pair keeps the state's type tied to its mixer's, so no state can reach another mixer.
struct MixerDecoder<Mixer: SequenceMixer>: MixerStream {
    let mixer: Mixer
    var state: Mixer.State

    mutating func infer(_ x: Tensor) -> Tensor { mixer.infer(x, state: &state) }
    var byteCount: Int { state.byteCount }

    func stacking(with others: [any MixerStream]) -> any MixerStream {
        let states = others.map { other -> Mixer.State in
            guard let same = other as? MixerDecoder<Mixer> else {
                fatalError("LanguageModel.DecodeState.stacking: the states belong to models with different mixers")
            }
            return same.state
        }
        return MixerDecoder(mixer: mixer, state: .stacking([state] + states))
    }
}

/// One block's decoding: advances its mixer's state by the positions of `x`.
protocol MixerStream {
    mutating func infer(_ x: Tensor) -> Tensor
    /// Bytes held by the mixer's state.
    var byteCount: Int { get }
    /// This state's sequences followed by those of `others` (states of the same block's mixer).
    func stacking(with others: [any MixerStream]) -> any MixerStream
}

/// `mixer.forward(x)` and the backward pass of that call, its cache captured with its own type.
private func forward<Mixer: SequenceMixer>(_ mixer: Mixer, _ x: Tensor) -> (Tensor, backward: (Tensor) -> Tensor) {
    let (y, cache) = mixer.forward(x)
    return (y, { dy in mixer.backward(dy, cache: cache) })
}

/// A decoder of `batch` empty sequences for `mixer`.
private func decoder<Mixer: SequenceMixer>(_ mixer: Mixer, batch: Int) -> any MixerStream {
    MixerDecoder(mixer: mixer, state: mixer.makeState(batch: batch))
}

/// One block: `x + mixer(norm(x))`, then `x + mlp(norm(x))`.
final class Block: ParameterContainer {
    let kind: MixerKind
    let mixerNorm: RMSNorm, mixer: any SequenceMixer, mlpNorm: RMSNorm, mlp: SwiGLU

    struct Cache {
        let input: Tensor, afterMixer: Tensor, mlp: SwiGLU.Cache
        /// The mixer's backward pass for this call (its cache inside).
        let mixerBackward: (Tensor) -> Tensor
        /// The dropout of the forward pass and this block's index, to regenerate its masks.
        let dropout: Dropout?, index: Int
    }

    init(_ name: String, kind: MixerKind, mixer: any SequenceMixer, configuration c: ModelConfiguration, rng: inout SeededGenerator) {
        self.kind = kind
        mixerNorm = RMSNorm(qualified(name, "mixer_norm"), dim: c.dim)
        self.mixer = mixer
        mlpNorm = RMSNorm(qualified(name, "mlp_norm"), dim: c.dim)
        mlp = SwiGLU(qualified(name, "mlp"), dim: c.dim, hidden: c.mlpHidden, rng: &rng)
    }

    var parameters: [Parameter] { mixerNorm.parameters + mixer.parameters + mlpNorm.parameters + mlp.parameters }

    func forward(_ x: Tensor, dropout: Dropout? = nil, index: Int = 0) -> (Tensor, Cache) {
        let (mixed, mixerBackward) = PhalanxModels.forward(mixer, mixerNorm.forward(x))
        dropout?.apply(to: mixed, block: index, branch: 0)
        mixed.add(x)
        let (out, mlpCache) = mlp.forward(mlpNorm.forward(mixed))
        dropout?.apply(to: out, block: index, branch: 1)
        out.add(mixed)
        return (out, Cache(input: x, afterMixer: mixed, mlp: mlpCache, mixerBackward: mixerBackward, dropout: dropout, index: index))
    }

    /// Inference: continues from the mixer's state, keeps no cache for backward.
    func infer(_ x: Tensor, state: inout any MixerStream) -> Tensor {
        let mixed = state.infer(mixerNorm.forward(x))
        mixed.add(x)
        let (out, _) = mlp.forward(mlpNorm.forward(mixed))
        out.add(mixed)
        return out
    }

    func backward(_ dy: Tensor, cache: Cache) -> Tensor {
        // Through the MLP branch (its dropout mask again), plus the residual.
        let dMixed = mlpNorm.backward(mlp.backward(masked(dy, cache, branch: 1), cache: cache.mlp), input: cache.afterMixer)
        dMixed.add(dy)
        // Through the mixer branch, plus the residual.
        let dx = mixerNorm.backward(cache.mixerBackward(masked(dMixed, cache, branch: 0)), input: cache.input)
        dx.add(dMixed)
        return dx
    }

    /// `d` times the forward pass's dropout mask of `branch`, as a copy (`d` itself also flows
    /// along the residual); `d` unchanged without dropout.
    private func masked(_ d: Tensor, _ cache: Cache, branch: Int) -> Tensor {
        guard let dropout = cache.dropout else { return d }
        let copy = d.copy()
        dropout.apply(to: copy, block: cache.index, branch: branch)
        return copy
    }
}

/// A hybrid language model (see `ModelConfiguration`), forward and hand-written backward.
///
/// Parameter names: `embed_tokens.weight`, `layers.{i}.mixer_norm.weight`,
/// `layers.{i}.mixer.*` (Phalanx: `param.proj_a.weight` ...; attention: `q_proj.weight` ...),
/// `layers.{i}.mlp_norm.weight`, `layers.{i}.mlp.{gate,up,down}_proj.weight`, `norm.weight`,
/// and `lm_head.weight` when the head is not tied to the embedding.
public final class LanguageModel: ParameterContainer {
    /// The model's shape, as stored in its checkpoints.
    public let configuration: ModelConfiguration
    let embedding: Embedding
    let blocks: [Block]
    let finalNorm: RMSNorm
    let head: Linear?
    let pool: WorkerPool

    /// What `loss` and `backward` need from `forward`, for one call.
    public struct Cache {
        /// Sequences and positions per sequence of the call.
        public let batch: Int, length: Int
        let tokens: [Int32]
        let blocks: [Block.Cache]
        let finalInput: Tensor, normalized: Tensor
        /// `[batch * length, vocabulary]`: logits after `forward`; their gradient after `loss`.
        public let logits: Tensor
    }

    /// Builds a model with seeded initialisation (the same seed gives the same weights).
    ///
    /// - Throws: `ConfigurationError` naming the first field out of range.
    public init(_ configuration: ModelConfiguration, seed: UInt64, pool: WorkerPool = .shared) throws {
        try configuration.validate()
        self.configuration = configuration
        self.pool = pool
        var rng = SeededGenerator(seed: seed)
        embedding = Embedding("embed_tokens", vocabulary: configuration.vocabulary, dim: configuration.dim, rng: &rng)
        blocks = configuration.mixers.enumerated().map { i, kind in
            let name = "layers.\(i)"
            let mixer = Self.makeMixer(kind, name: qualified(name, "mixer"), configuration, rng: &rng)
            return Block(name, kind: kind, mixer: mixer, configuration: configuration, rng: &rng)
        }
        finalNorm = RMSNorm("norm", dim: configuration.dim)
        head = configuration.tiedEmbedding ? nil
            : Linear("lm_head", inputs: configuration.dim, outputs: configuration.vocabulary, bias: false, rng: &rng)
    }

    static func makeMixer(_ kind: MixerKind, name: String, _ c: ModelConfiguration, rng: inout SeededGenerator) -> any SequenceMixer {
        switch kind {
        case .phalanx:
            return PhalanxLayer(name, .init(dim: c.dim, kvHeads: c.phalanxKVHeads, gateScale: c.gateScale,
                                                            blockLength: c.blockLength, blocksSeen: c.blocksSeen), rng: &rng)
        case .attention, .slidingWindow:
            return Attention(name, dim: c.dim, heads: c.attentionHeads, kvHeads: c.attentionKVHeads,
                                      headDim: c.attentionHeadDim, window: kind == .slidingWindow ? c.window : nil,
                                      ropeBase: c.ropeBase, rng: &rng)
        }
    }

    /// Every parameter in checkpoint order (see the names above).
    public var parameters: [Parameter] {
        embedding.parameters + blocks.flatMap(\.parameters) + finalNorm.parameters + (head?.parameters ?? [])
    }

    /// Logits `[batch * length, vocabulary]` for `tokens` `[batch, length]`; `dropout` for a
    /// training pass (backward then applies the same masks).
    public func forward(tokens: [Int32], batch: Int, length: Int, dropout: Dropout? = nil) -> Cache {
        var x = embedding.forward(tokens, batch: batch, length: length)
        var caches: [Block.Cache] = []
        for (index, block) in blocks.enumerated() {
            let (y, cache) = block.forward(x, dropout: dropout, index: index)
            caches.append(cache)
            x = y
        }
        let normalized = finalNorm.forward(x)
        let logits = logits(normalized, rows: batch * length)
        return Cache(batch: batch, length: length, tokens: tokens, blocks: caches, finalInput: x,
                     normalized: normalized, logits: logits)
    }

    /// Mean cross-entropy (nats per token) of `targets` under the logits of `cache`, and the
    /// logits' gradient left in `cache.logits`, scaled by `gradientScale / count`:
    ///
    ///     loss = mean_r ( logsumexp(z_r) - z_r[t_r] ),   dz_r = (softmax(z_r) - onehot(t_r)) * scale / count
    public func loss(_ cache: Cache, targets: [Int32], gradientScale: Float = 1) -> Float {
        let rows = cache.batch * cache.length, V = configuration.vocabulary
        require(targets.count == rows, "LanguageModel.loss: \(targets.count) targets for \(rows) positions")
        if case .cuda(let gpu) = cache.logits.device {
            return DeviceOps.crossEntropy(cache.logits, targets: targets, gradientScale: gradientScale, on: gpu)
        }
        let z = cache.logits.pointer
        let parts = min(pool.threadCount, max(rows / 16, 1))
        var partial = [Double](repeating: 0, count: parts)
        let scale = gradientScale / Float(rows)
        partial.withUnsafeMutableBufferPointer { partial in
            targets.withUnsafeBufferPointer { t in
                pool.run(parts) { p in
                    var sum = 0.0
                    for r in (p * rows / parts)..<((p + 1) * rows / parts) {
                        let row = z + r * V
                        var maxLogit = -Float.infinity
                        for j in 0..<V { maxLogit = max(maxLogit, row[j]) }
                        let target = Int(t[r])
                        let targetLogit = row[target]
                        var total: Float = 0
                        forEachChannelChunk(V, vector: { j in
                            let e = exp(load16(row + j) - maxLogit)
                            store16(e, row + j)
                            total += horizontalSum(e)
                        }, scalar: { j in
                            let e = exp(row[j] - maxLogit)
                            row[j] = e
                            total += e
                        })
                        sum += Double(log(total) + maxLogit - targetLogit)
                        let inverse = scale / total
                        forEachChannelChunk(V, vector: { j in store16(load16(row + j) * inverse, row + j) },
                                            scalar: { j in row[j] *= inverse })
                        row[target] -= scale
                    }
                    partial[p] = sum
                }
            }
        }
        return Float(partial.reduce(0, +) / Double(rows))
    }

    /// The cross-entropy (nats) of each position's target under the logits of `cache`, without
    /// touching them (no gradient), in double precision:
    ///
    ///     loss_r = logsumexp(z_r) - z_r[t_r]        [batch * length]
    public func tokenLosses(_ cache: Cache, targets: [Int32]) -> [Double] {
        let rows = cache.batch * cache.length, V = configuration.vocabulary
        require(targets.count == rows, "LanguageModel.tokenLosses: \(targets.count) targets for \(rows) positions")
        let z = cache.logits.array
        return (0..<rows).map { r in
            let row = z[(r * V)..<((r + 1) * V)].map(Double.init)
            let maxLogit = row.max() ?? -.infinity
            let total = row.reduce(0) { $0 + Foundation.exp($1 - maxLogit) }
            return Foundation.log(total) + maxLogit - row[Int(targets[r])]
        }
    }

    /// Adds every parameter gradient, from the logits' gradient that `loss` left in the cache.
    ///
    /// - Parameter gradientsFinished: called as backward proceeds, with an index `k` into
    ///   `parameters` such that every parameter at `k` or later has received all of this pass's
    ///   gradient (its work queued, on a GPU): after the final norm (and an untied head), after
    ///   each block from the last to the first, and with 0 at the end (the embedding, which a tied
    ///   head also feeds, last). A data-parallel trainer starts reducing gradients from here.
    public func backward(_ cache: Cache, gradientsFinished: ((Int) -> Void)? = nil) {
        let rows = cache.batch * cache.length, V = configuration.vocabulary, dim = configuration.dim
        let dNormalized = Tensor(uninitialized: [cache.batch, cache.length, dim], like: cache.normalized)
        if let head {
            head.backward(cache.logits, input: cache.normalized, inputGradient: dNormalized)
        } else if case .cuda(let gpu) = cache.logits.device {
            // Tied head: dE += dz^T h (float32), dh = dz E.
            let table = embedding.weight
            gpu.perform {
                try DeviceMatrix.multiply(on: gpu, DeviceMatrix.of(cache.logits), transposeA: true, DeviceMatrix.of(cache.normalized, rows: rows, columns: dim),
                                          into: DeviceMatrix.of(table.gradient), beta: 1)
                try DeviceMatrix.multiply(on: gpu, DeviceMatrix.of(cache.logits), DeviceMatrix.of(table.value.compute),
                                          into: DeviceMatrix.of(dNormalized, rows: rows, columns: dim))
            }
        } else {
            Gemm.multiply(m: V, n: dim, k: rows, cache.logits.pointer, transposeA: true, cache.normalized.pointer,
                          into: embedding.weight.gradient.pointer, beta: 1, pool: pool)
            Gemm.multiply(m: rows, n: dim, k: V, cache.logits.pointer, embedding.weight.value.pointer,
                          into: dNormalized.pointer, pool: pool)
        }
        var dx = finalNorm.backward(dNormalized, input: cache.finalInput)
        // Parameter order: embedding, blocks, final norm, untied head.
        var firstIndex = parameters.count - finalNorm.parameters.count - (head?.parameters.count ?? 0)
        gradientsFinished?(firstIndex)
        for (block, blockCache) in zip(blocks, cache.blocks).reversed() {
            dx = block.backward(dx, cache: blockCache)
            firstIndex -= block.parameters.count
            gradientsFinished?(firstIndex)
        }
        embedding.backward(dx, tokens: cache.tokens)
        gradientsFinished?(0)
    }

    /// What decoding carries between calls: one state per block's mixer (a Phalanx recurrence
    /// state, an attention key/value cache, a sliding-window ring) and the position reached.
    public struct DecodeState {
        var mixers: [any MixerStream]
        /// The mixer kind of each block, in order.
        let kinds: [MixerKind]
        /// Sequences decoded together.
        public let batch: Int
        /// Positions processed so far by each sequence.
        public internal(set) var positions: [Int]

        /// Bytes held by all mixer states.
        public var byteCount: Int { mixers.reduce(0) { $0 + $1.byteCount } }

        /// Bytes held by the states of the blocks whose mixer is `kind`.
        public func byteCount(of kind: MixerKind) -> Int {
            zip(kinds, mixers).reduce(0) { total, block in total + (block.0 == kind ? block.1.byteCount : 0) }
        }

        /// The sequences of `parts` (states of one model, for example prompts prefilled one by
        /// one), in order, as one state decoded together; each sequence keeps its own position.
        public static func stacking(_ parts: [DecodeState]) -> DecodeState {
            require(!parts.isEmpty && parts.allSatisfy { $0.kinds == parts[0].kinds },
                    "LanguageModel.DecodeState.stacking: needs states of one model")
            let mixers = parts[0].mixers.indices.map { i in
                parts[0].mixers[i].stacking(with: parts.dropFirst().map { $0.mixers[i] })
            }
            return DecodeState(mixers: mixers, kinds: parts[0].kinds, batch: parts.reduce(0) { $0 + $1.batch },
                               positions: parts.flatMap(\.positions))
        }
    }

    /// The state of `batch` empty sequences.
    public func makeDecodeState(batch: Int) -> DecodeState {
        DecodeState(mixers: blocks.map { decoder($0.mixer, batch: batch) }, kinds: blocks.map(\.kind), batch: batch,
                    positions: Array(repeating: 0, count: batch))
    }

    /// Logits `[batch * length, vocabulary]` for the next `length` tokens of each sequence
    /// (`tokens` `[batch, length]`), continuing from `state`: a prefill chunk of any size or one
    /// decode step. Equal to `forward` over the whole sequences.
    public func infer(tokens: [Int32], length: Int, state: inout DecodeState) -> Tensor {
        let batch = state.batch
        var x = embedding.forward(tokens, batch: batch, length: length)
        for (i, block) in blocks.enumerated() { x = block.infer(x, state: &state.mixers[i]) }
        state.positions = state.positions.map { $0 + length }
        return logits(finalNorm.forward(x), rows: batch * length)
    }

    private func logits(_ normalized: Tensor, rows: Int) -> Tensor {
        let V = configuration.vocabulary, dim = configuration.dim
        let logits = Tensor(uninitialized: [rows, V], like: normalized)
        if let head {
            head.forward(normalized, into: logits)
        } else if case .cuda(let gpu) = normalized.device {
            gpu.perform {
                try DeviceMatrix.multiply(on: gpu, DeviceMatrix.of(normalized, rows: rows, columns: dim), DeviceMatrix.of(embedding.weight.value.compute),
                                          transposeB: true, into: DeviceMatrix.of(logits))
            }
        } else {
            Gemm.multiply(m: rows, n: V, k: dim, normalized.pointer, embedding.weight.value.pointer, transposeB: true,
                          into: logits.pointer, pool: pool)
        }
        return logits
    }

    /// Copies into this model every parameter of `source` that has a parameter here of the same
    /// name and shape (a retrofit: embeddings, norms, MLPs and the mixers that did not change
    /// keep their trained values); the others keep their initialisation.
    ///
    /// Where a Phalanx mixer replaces an attention mixer of the same block, the attention's value
    /// and output projections become the Phalanx layer's (`v_proj` to `param.proj_v`, `o_proj` to
    /// `proj_out`, when their shapes agree): the new layer, `proj_out(s * c + v)`, then starts as
    /// attention that looks only at the current position, plus the recurrence `s * c`, instead of
    /// from nothing.
    ///
    /// - Returns: the names copied and the names left as initialised, in parameter order.
    public func copyMatchingParameters(from source: LanguageModel) -> (copied: [String], initialised: [String]) {
        var trained = Dictionary(source.parameters.map { ($0.name, $0) }, uniquingKeysWith: { first, _ in first })
        for (index, (old, new)) in zip(source.mixerKinds, mixerKinds).enumerated() where old != .phalanx && new == .phalanx {
            let prefix = "layers.\(index).mixer."
            for (attention, phalanx) in [("v_proj.weight", "param.proj_v.weight"), ("o_proj.weight", "proj_out.weight")] {
                trained[prefix + phalanx] = trained[prefix + attention]
            }
        }
        var copied: [String] = [], initialised: [String] = []
        for parameter in parameters {
            if let match = trained[parameter.name], match.value.shape == parameter.value.shape {
                parameter.value.pointer.update(from: match.value.pointer, count: parameter.value.count)
                copied.append(parameter.name)
            } else {
                initialised.append(parameter.name)
            }
        }
        return (copied, initialised)
    }

    /// One step of layer-wise distillation for a retrofit: for each block `i` of `distilled`, this
    /// model's mixer is asked to reproduce `teacher`'s mixer output on `teacher`'s own block input,
    ///
    ///     loss = 1/|distilled| * sum over i of mean((mixer_i(norm_i(x_i)) - m_i)^2)
    ///
    /// with `x_i` the teacher's input to block `i` and `m_i` its mixer's output there (both from
    /// one teacher forward over `tokens` `[batch, length]`). Adds the gradient of `loss` to the
    /// distilled mixers' parameters (nothing else) and returns `loss`.
    public func distillMixers(from teacher: LanguageModel, blocks distilled: [Int], tokens: [Int32], batch: Int, length: Int) -> Float {
        require(teacher.blocks.count == blocks.count && distilled.allSatisfy { blocks.indices.contains($0) },
                "LanguageModel.distillMixers: blocks \(distilled) of a teacher of \(teacher.blocks.count) blocks and a model of \(blocks.count)")
        let taught = teacher.forward(tokens: tokens, batch: batch, length: length)
        var total: Double = 0
        for i in distilled {
            let input = taught.blocks[i].input, teacherOutput = zip(taught.blocks[i].afterMixer.array, input.array).map { $0 - $1 }
            let (y, backward) = PhalanxModels.forward(blocks[i].mixer, blocks[i].mixerNorm.forward(input))
            let difference = zip(y.array, teacherOutput).map { $0 - $1 }
            let scale = 2 / Float(difference.count * distilled.count)
            total += difference.reduce(0) { $0 + Double($1 * $1) } / Double(difference.count * distilled.count)
            _ = backward(Tensor(difference.map { $0 * scale }, shape: y.shape, on: y.device, format: y.format))
        }
        return Float(total)
    }

    /// The parameters of block `index`'s mixer.
    public func mixerParameters(block index: Int) -> [Parameter] { blocks[index].mixer.parameters }

    /// The mixer kinds of the blocks, in order.
    public var mixerKinds: [MixerKind] { blocks.map(\.kind) }

    /// Model FLOPs of one training step over `tokens` tokens in sequences of `context`, the
    /// usual count for model-FLOPs utilisation:
    ///
    ///     6 * N * T   (every weight: a multiply-add forward, two backward; N includes the tied head)
    ///   + 6 * 2 * T * span * d_attn per attention layer   (scores and values; span = L/2 causal,
    ///                                                      min(w, L) - w^2/2L sliding window)
    public func trainingFlops(tokens: Int, context: Int) -> Double {
        let c = configuration
        var flops = 6 * Double(parameterCount) * Double(tokens)
        let width = Double(c.attentionHeads * c.attentionHeadDim), L = Double(context)
        for kind in mixerKinds {
            let span: Double
            switch kind {
            case .phalanx: continue
            case .attention: span = L / 2
            case .slidingWindow:
                let w = min(Double(c.window), L)
                span = w - w * w / (2 * L)
            }
            flops += 6 * 2 * Double(tokens) * span * width
        }
        return flops
    }
}
