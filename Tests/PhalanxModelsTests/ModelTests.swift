import Checkpoint
import Foundation
import PhalanxData
import PhalanxLayers
import PhalanxModels
import PhalanxRuntime
import PhalanxTestSupport
import PhalanxTraining
import Testing

/// A tiny model of every mixer kind: dim 32, 2 attention heads of 16, window 8, pattern `PSA`.
func tinyConfiguration(pattern: String = "PSA", depth: Int = 3) -> ModelConfiguration {
    ModelConfiguration(vocabulary: 256, dim: 32, depth: depth, pattern: pattern, attentionHeads: 2, window: 8, mlpHidden: 48)
}

/// A small generated corpus (no third-party text): a repetitive, learnable pattern.
func syntheticText(lines: Int = 400) -> String {
    let words = ["alpha", "beta", "gamma", "delta", "sigma", "omega"]
    return (0..<lines).map { i in "\(words[i % 6]) \(words[(i * 7 + 1) % 6]) \(i % 10);" }.joined(separator: "\n")
}

/// A token file of `syntheticText` in a fresh folder.
func syntheticTokenFile() throws -> (TokenFile, URL) {
    let folder = temporaryFolder()
    let text = folder.appendingPathComponent("corpus.txt")
    try syntheticText().write(to: text, atomically: true, encoding: .utf8)
    let tokens = folder.appendingPathComponent("tokens.bin")
    _ = try CorpusPreparation.prepare(files: [text], tokenizer: ByteTokenizer(), output: tokens)
    return (try TokenFile(contentsOf: tokens), folder)
}

@Suite("Language model")
struct ModelTests {
    @Test("the pattern tiles over the depth; presets of one size have equal parameter counts")
    func patternsAndPresets() throws {
        let c = ModelConfiguration(dim: 32, depth: 7, pattern: "PPPA", attentionHeads: 2, mlpHidden: 48)
        #expect(c.mixers.map { String($0.rawValue) }.joined() == "PPPAPPP")
        for size in ["tiny", "small"] {
            let counts = try ["transformer", "swa-hybrid", "phalanx-hybrid"].map {
                try LanguageModel(ModelConfiguration.preset("\($0)-\(size)"), seed: 0).parameterCount
            }
            let spread = Double(counts.max()! - counts.min()!) / Double(counts.min()!)
            #expect(spread < 0.005, "\(size): \(counts)")
        }
        #expect(try LanguageModel(ModelConfiguration.preset("phalanx-hybrid-small"), seed: 0).parameterCount > 3_000_000)
        #expect(throws: ConfigurationError.self) { try ModelConfiguration.preset("mamba-huge") }
        var bad = c
        bad.pattern = "PXA"
        #expect { try bad.validate() } throws: { "\($0)".contains("pattern must be") }
    }

    @Test("whole-model gradient: directional finite differences agree with backward, with and without dropout",
          arguments: [nil, Dropout(rate: 0.3, seed: 4, step: 2, microBatch: 1)])
    func wholeModelGradient(dropout: Dropout?) throws {
        let model = try LanguageModel(tinyConfiguration(), seed: 3)
        var rng = SeededGenerator(seed: 5)
        let (batch, length) = (2, 21)
        let tokens = (0..<(batch * length)).map { _ in Int32.random(in: 0..<256, using: &rng) }
        let targets = (0..<(batch * length)).map { _ in Int32.random(in: 0..<256, using: &rng) }
        func loss() -> Double {
            let cache = model.forward(tokens: tokens, batch: batch, length: length, dropout: dropout)
            return Double(model.loss(cache, targets: targets, gradientScale: 0))
        }
        model.zeroGradients()
        let cache = model.forward(tokens: tokens, batch: batch, length: length, dropout: dropout)
        _ = model.loss(cache, targets: targets)
        model.backward(cache)
        // Along random directions over all parameters at once: float32 forward passes, so the step
        // is large and the tolerance is that of float32 differences (each layer's gradient is
        // checked exactly, in double precision, in PhalanxLayersTests).
        for trial in 0..<3 {
            var direction: [[Float]] = []
            var analytic = 0.0
            for p in model.parameters {
                let d = (0..<p.value.count).map { _ in Float.random(in: -1...1, using: &rng) }
                direction.append(d)
                for j in 0..<d.count { analytic += Double(d[j]) * Double(p.gradient[j]) }
            }
            let step: Float = 1e-3
            func shift(_ sign: Float) {
                for (p, d) in zip(model.parameters, direction) { for j in 0..<d.count { p.value[j] += sign * step * d[j] } }
            }
            shift(1)
            let plus = loss()
            shift(-2)
            let minus = loss()
            shift(1)
            let numeric = (plus - minus) / (2 * Double(step))
            #expect(abs(numeric - analytic) <= 2e-2 * abs(analytic) + 1e-3, "trial \(trial): numeric \(numeric), analytic \(analytic)")
        }
    }

    @Test("a tiny model overfits a tiny corpus", arguments: ["P", "PSA"])
    func overfits(pattern: String) throws {
        let (tokens, folder) = try syntheticTokenFile()
        defer { try? FileManager.default.removeItem(at: folder) }
        var training = TrainingConfiguration()
        training.steps = 150
        training.batchSize = 8
        training.contextLength = 32
        training.peakLearningRate = 1e-2
        training.warmupSteps = 10
        training.evaluationInterval = 0
        training.checkpointInterval = 0
        let model = try LanguageModel(tinyConfiguration(pattern: pattern, depth: 2), seed: 1)
        let state = TrainingState(configuration: training, samplerSeed: 2,
                                  dataPath: "", tokenizer: try ByteTokenizer().serialized(), modelSeed: 1)
        let trainer = try Trainer(model: model, optimizer: AdamW(model.parameters, hyperparameters: training.optimizer),
                                  state: state, data: tokens, runFolder: folder)
        var first: Float?
        var last: Float = .nan
        let outcome = try trainer.run(stopRequested: { false }, onStep: { r in
            if first == nil { first = r.loss }
            last = r.loss
        }, onEvaluation: { _ in })
        #expect(outcome == .finished)
        #expect(first! > 4, "a fresh byte model starts near ln 256 = 5.5")
        #expect(last < 1.2, "\(pattern): loss \(last) after 150 steps on a repetitive corpus")
    }

    @Test("dropout keeps 1 - rate of the elements, scaled by 1 / (1 - rate), with masks fixed by step and place")
    func dropoutMasks() {
        func masked(_ dropout: Dropout, block: Int = 0, branch: Int = 0) -> [Float] {
            let t = Tensor([Float](repeating: 1, count: 100_000), shape: [100_000])
            dropout.apply(to: t, block: block, branch: branch)
            return t.array
        }
        let d = Dropout(rate: 0.25, seed: 1, step: 3)
        let m = masked(d)
        let kept = m.filter { $0 != 0 }
        #expect(kept.allSatisfy { $0 == 1 / Float(0.75) })
        #expect(abs(Double(kept.count) / 100_000 - 0.75) < 0.01)
        #expect(masked(d) == m)
        for other in [masked(Dropout(rate: 0.25, seed: 1, step: 4)), masked(Dropout(rate: 0.25, seed: 2, step: 3)),
                      masked(Dropout(rate: 0.25, seed: 1, step: 3, microBatch: 1)), masked(d, block: 1), masked(d, branch: 1)] {
            let agreement = zip(m, other).filter { ($0 == 0) == ($1 == 0) }.count
            #expect(Double(agreement) / 100_000 < 0.7, "independent masks agree on about 62.5% of elements")
        }
    }

    @Test("checkpoints round-trip, and a resumed run reproduces the uninterrupted losses exactly (with dropout)")
    func checkpointAndResume() throws {
        let (tokens, folder) = try syntheticTokenFile()
        defer { try? FileManager.default.removeItem(at: folder) }
        var training = TrainingConfiguration()
        training.steps = 12
        training.batchSize = 4
        training.contextLength = 24
        training.accumulation = 2
        training.warmupSteps = 3
        training.evaluationInterval = 0
        training.checkpointInterval = 0
        training.dropout = 0.2
        func freshTrainer(_ run: String) throws -> Trainer {
            let model = try LanguageModel(tinyConfiguration(), seed: 7)
            let state = TrainingState(configuration: training, samplerSeed: 9,
                                      dataPath: "", tokenizer: try ByteTokenizer().serialized(), modelSeed: 7)
            return try Trainer(model: model, optimizer: AdamW(model.parameters, hyperparameters: training.optimizer),
                               state: state, data: tokens, runFolder: folder.appendingPathComponent(run))
        }
        var straight: [Float] = []
        _ = try freshTrainer("straight").run(stopRequested: { false }, onStep: { straight.append($0.loss) }, onEvaluation: { _ in })

        let interrupted = try freshTrainer("split")
        var firstPart: [Float] = []
        let outcome = try interrupted.run(stopRequested: { firstPart.count == 5 }, onStep: { firstPart.append($0.loss) },
                                          onEvaluation: { _ in })
        #expect(outcome == .interrupted(step: 5))
        let (model, optimizer, state) = try TrainingCheckpoint.load(from: interrupted.checkpointURL)
        #expect(state.step == 5 && optimizer.step == 5)
        for (a, b) in zip(model.parameters, interrupted.model.parameters) {
            #expect(a.name == b.name && a.value.array == b.value.array)
        }
        let resumed = try Trainer(model: model, optimizer: optimizer, state: state, data: tokens, runFolder: interrupted.runFolder)
        var secondPart: [Float] = []
        _ = try resumed.run(stopRequested: { false }, onStep: { secondPart.append($0.loss) }, onEvaluation: { _ in })
        #expect(firstPart + secondPart == straight)
        #expect(FileManager.default.fileExists(atPath: resumed.plotURL.path))
    }

    @Test("corrupt and truncated checkpoints fail with a clear message")
    func corruptCheckpoints() throws {
        let folder = temporaryFolder()
        defer { try? FileManager.default.removeItem(at: folder) }
        let model = try LanguageModel(tinyConfiguration(pattern: "P", depth: 1), seed: 1)
        let state = TrainingState(configuration: TrainingConfiguration(), samplerSeed: 1,
                                  dataPath: "", tokenizer: try ByteTokenizer().serialized(), modelSeed: 1)
        let url = folder.appendingPathComponent("checkpoint.safetensors")
        try TrainingCheckpoint.save(model: model, optimizer: AdamW(model.parameters), state: state, to: url)
        let bytes = try Data(contentsOf: url)
        let truncated = folder.appendingPathComponent("truncated.safetensors")
        try bytes.prefix(bytes.count - 100).write(to: truncated)
        #expect { try TrainingCheckpoint.load(from: truncated) } throws: { "\($0)".contains("truncated") }
        let garbage = folder.appendingPathComponent("garbage.safetensors")
        try Data("not a checkpoint at all".utf8).write(to: garbage)
        #expect { try TrainingCheckpoint.load(from: garbage) } throws: { "\($0)".contains("garbage.safetensors") }
        var weightsOnly = SafetensorsWriter()
        weightsOnly.add("x", floats: [1], shape: [1])
        let foreign = folder.appendingPathComponent("foreign.safetensors")
        try weightsOnly.write(to: foreign)
        #expect { try TrainingCheckpoint.load(from: foreign) } throws: { "\($0)".contains("not a Phalanx checkpoint") }
    }
}
