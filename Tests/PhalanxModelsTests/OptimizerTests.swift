import Foundation
import PhalanxData
import PhalanxLayers
import PhalanxModels
import PhalanxRuntime
import PhalanxTestSupport
import PhalanxTraining
import Testing

/// AdamW, its decay masks, the learning-rate schedule and gradient clipping, each against its formula.
@Suite("Optimizer, schedule and clipping")
struct OptimizerTests {
    static func parameter(_ name: String, _ values: [Float], gradient: [Float], decays: Bool) -> Parameter {
        let p = Parameter(name, Tensor(values, shape: [values.count]), decays: decays)
        _ = p.gradient.buffer.update(fromContentsOf: gradient)
        return p
    }

    /// AdamW in double precision, `steps` updates with the same gradient each step.
    static func adamW(_ w: [Double], gradient g: [Double], steps: Int, lr: Double, decay: Double,
                      beta1: Double = 0.9, beta2: Double = 0.95, eps: Double = 1e-8) -> [Double] {
        var w = w, m = [Double](repeating: 0, count: w.count), v = m
        for t in 1...steps {
            for j in w.indices {
                m[j] = beta1 * m[j] + (1 - beta1) * g[j]
                v[j] = beta2 * v[j] + (1 - beta2) * g[j] * g[j]
                let update = m[j] / (1 - pow(beta1, Double(t))) / ((v[j] / (1 - pow(beta2, Double(t)))).squareRoot() + eps)
                w[j] -= lr * (update + decay * w[j])
            }
        }
        return w
    }

    @Test("three AdamW steps equal the formula; parameters with decays: false get no weight decay")
    func adamWAndDecayMask() {
        var rng = SeededGenerator(seed: 71)
        let w1 = randomInputs(40, &rng), w2 = randomInputs(40, &rng), g = randomInputs(40, scale: 0.1, &rng)
        let matrix = Self.parameter("m.weight", w1, gradient: g, decays: true)
        let norm = Self.parameter("n.weight", w2, gradient: g, decays: false)
        var h = AdamW.Hyperparameters()
        h.weightDecay = 0.3
        let optimizer = AdamW([matrix, norm], hyperparameters: h)
        for _ in 0..<3 { optimizer.update(learningRate: 0.05) }
        let g64 = g.map(Double.init)
        // Each step moves a weight by about lr = 0.05; float32 keeps it to a few 1e-8.
        expectClose(matrix.value.array, Self.adamW(w1.map(Double.init), gradient: g64, steps: 3, lr: 0.05, decay: 0.3),
                    tolerance: .float32Layer, "decayed")
        expectClose(norm.value.array, Self.adamW(w2.map(Double.init), gradient: g64, steps: 3, lr: 0.05, decay: 0),
                    tolerance: .float32Layer, "not decayed")
        #expect(optimizer.step == 3)
    }

    @Test("with zero gradients only decay moves a weight: by lr * wd * w where decayed, not at all elsewhere, unless decayAll")
    func decayOnly() {
        for decayAll in [false, true] {
            let matrix = Self.parameter("m.weight", [1, -2, 4], gradient: [0, 0, 0], decays: true)
            let bias = Self.parameter("m.bias", [1, -2, 4], gradient: [0, 0, 0], decays: false)
            var h = AdamW.Hyperparameters()
            h.weightDecay = 0.5
            h.decayAll = decayAll
            AdamW([matrix, bias], hyperparameters: h).update(learningRate: 0.1)
            expectClose(matrix.value.array, [0.95, -1.9, 3.8], tolerance: .float32Kernel, "decayAll \(decayAll)")
            if decayAll {
                expectClose(bias.value.array, [0.95, -1.9, 3.8], tolerance: .float32Kernel, "decayAll")
            } else {
                #expect(bias.value.array == [1, -2, 4], "a parameter with decays: false does not move")
            }
        }
    }

    @Test("the model decays its matrices only: not the embedding, the norms or the biases")
    func modelDecayMasks() throws {
        let model = try LanguageModel(tinyConfiguration(), seed: 0)
        for p in model.parameters {
            let exempt = p.name == "embed_tokens.weight" || p.name.hasSuffix("norm.weight") || p.name.hasSuffix(".bias")
            #expect(p.decays == !exempt, "\(p.name) decays: \(p.decays)")
        }
        #expect(model.parameters.contains { $0.decays } && model.parameters.contains { !$0.decays })
    }

    @Test("the schedule: linear warm-up to the peak, cosine decay to peak * final fraction, then flat")
    func schedule() {
        var c = TrainingConfiguration()
        c.peakLearningRate = 2e-3
        c.warmupSteps = 10
        c.steps = 110
        c.finalLearningRateFraction = 0.1
        let lr = c.schedule
        let peak = 2e-3, f = 0.1
        // step s (0-based) -> lr: (s + 1) / warmup of the peak during warm-up, then
        // peak * (f + (1 - f) * (1 + cos(pi * (s - warmup) / (steps - warmup))) / 2).
        let expected: [(Int, Double)] = [
            (0, peak / 10), (4, peak / 2), (9, peak), (10, peak),
            (35, peak * (f + (1 - f) * (1 + cos(Double.pi / 4)) / 2)), (60, peak * (f + (1 - f) / 2)),
            (110, peak * f), (500, peak * f),
        ]
        for (step, value) in expected {
            #expect(abs(Double(lr(step)) - value) <= 1e-6 * peak, "step \(step): \(lr(step)), expected \(value)")
        }
        let decay = (10...110).map { lr($0) }
        #expect(zip(decay, decay.dropFirst()).allSatisfy { $0 >= $1 }, "decays monotonically")
        // No warm-up: the first step is already at the peak.
        c.warmupSteps = 0
        #expect(abs(Double(c.schedule(0)) - peak) <= 1e-6 * peak)
    }

    @Test("clipping scales the gradients to the maximum norm, keeps their direction, and returns the norm before")
    func clipping() {
        // Global norm over both parameters: sqrt(9 + 16 + 144) = 13.
        func parameters() -> [Parameter] {
            [Self.parameter("a", [0, 0], gradient: [3, 4], decays: true), Self.parameter("b", [0], gradient: [12], decays: false)]
        }
        func norm(_ ps: [Parameter]) -> Double {
            ps.flatMap(\.gradient.array).reduce(0) { $0 + Double($1) * Double($1) }.squareRoot()
        }
        let clipped = parameters()
        #expect(clipGradients(clipped, maxNorm: 1) == 13)
        #expect(abs(norm(clipped) - 1) <= 1e-6, "norm after clipping \(norm(clipped))")
        expectClose(clipped.flatMap(\.gradient.array), [3, 4, 12].map { $0 / 13 }, tolerance: .float32Kernel, "direction")
        for maxNorm: Float in [13, 20, 0] {  // at or below the maximum, or clipping off: unchanged
            let kept = parameters()
            #expect(clipGradients(kept, maxNorm: maxNorm) == 13)
            #expect(kept.flatMap(\.gradient.array) == [3, 4, 12], "max norm \(maxNorm)")
        }
    }

    @Test("the trainer steps with the schedule's rate and reports the gradient norm before clipping")
    func trainerUsesScheduleAndClip() throws {
        let (tokens, folder) = try syntheticTokenFile()
        defer { try? FileManager.default.removeItem(at: folder) }
        var training = TrainingConfiguration()
        training.steps = 6
        training.batchSize = 2
        training.contextLength = 16
        training.warmupSteps = 3
        training.gradientClip = 1e-3  // far below any real gradient norm: every step is clipped
        training.evaluationInterval = 0
        training.checkpointInterval = 0
        let model = try LanguageModel(tinyConfiguration(pattern: "P", depth: 1), seed: 1)
        let state = TrainingState(configuration: training, samplerSeed: 2,
                                  dataPath: "", tokenizer: try ByteTokenizer().serialized(), modelSeed: 1)
        let trainer = try Trainer(model: model, optimizer: AdamW(model.parameters, hyperparameters: training.optimizer),
                                  state: state, data: tokens, runFolder: folder)
        var reports: [Trainer.StepReport] = []
        _ = try trainer.run(stopRequested: { false }, onStep: { reports.append($0) }, onEvaluation: { _ in })
        #expect(reports.map(\.learningRate) == (0..<6).map { training.schedule($0) })
        #expect(reports.allSatisfy { $0.gradientNorm > 1e-2 }, "the reported norm is the one before clipping")
        // The gradients left after the last step are the clipped ones.
        let left = model.parameters.flatMap(\.gradient.array).reduce(0) { $0 + Double($1) * Double($1) }.squareRoot()
        #expect(abs(left - 1e-3) <= 1e-8, "norm of the gradients the last update used: \(left)")
    }
}
