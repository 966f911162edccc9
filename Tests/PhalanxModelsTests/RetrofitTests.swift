import Foundation
import PhalanxData
import PhalanxModels
import PhalanxRuntime
import PhalanxTestSupport
import PhalanxTraining
import Testing

@Suite("Retrofit: a trained model takes a new layer pattern and keeps what still fits")
struct RetrofitTests {
    /// A generated corpus (no third-party text) and a trained `SA` run beside it.
    func trainedSource(in folder: URL) throws -> (corpus: URL, checkpoint: URL) {
        let corpus = folder.appendingPathComponent("corpus.txt")
        let words = ["amber", "basalt", "cobalt", "dune", "ember", "fjord"]
        try (0..<400).map { i in "\(words[i % 6]) \(words[(i * 5 + 1) % 6]) \(i % 11)." }.joined(separator: "\n")
            .write(to: corpus, atomically: true, encoding: .utf8)
        var training = TrainingConfiguration()
        (training.steps, training.batchSize, training.contextLength, training.warmupSteps) = (4, 2, 16, 1)
        (training.evaluationInterval, training.evaluationBatches, training.checkpointInterval) = (0, 1, 0)
        let model = ModelConfiguration(dim: 32, depth: 2, pattern: "SA", attentionHeads: 2, window: 8, mlpHidden: 48)
        let run = folder.appendingPathComponent("source")
        let trainer = try TrainingRun.start(TrainingRun.Plan(model: model, training: training, files: [corpus], seed: 3), in: run)
        _ = try trainer.run(stopRequested: { false }, onStep: { _ in }, onEvaluation: { _ in })
        return (corpus, TrainingRun.checkpointURL(in: run))
    }

    @Test("SA becomes PA: embedding, norms, MLPs and the attention block that stays are the trained ones; the new Phalanx mixer takes the attention's value and output projections and initialises the rest; fine-tuning runs")
    func windowAttentionBecomesPhalanx() throws {
        let folder = temporaryFolder()
        defer { try? FileManager.default.removeItem(at: folder) }
        let (corpus, checkpoint) = try trainedSource(in: folder)
        let (source, _, _) = try TrainingCheckpoint.load(from: checkpoint)
        var training = TrainingConfiguration()
        (training.steps, training.batchSize, training.contextLength, training.warmupSteps) = (2, 2, 16, 1)
        (training.evaluationInterval, training.evaluationBatches, training.checkpointInterval) = (0, 1, 0)
        let plan = try Retrofit.plan(from: checkpoint, pattern: "PA", training: training, files: [corpus], seed: 9)
        #expect(plan.model.pattern == "PA" && plan.model.dim == 32 && plan.model.window == 8)
        let trainer = try TrainingRun.start(plan, in: folder.appendingPathComponent("retrofit"))

        let trained = Dictionary(uniqueKeysWithValues: source.parameters.map { ($0.name, $0.value.array) })
        let inherited = ["layers.0.mixer.param.proj_v.weight": "layers.0.mixer.v_proj.weight",
                         "layers.0.mixer.proj_out.weight": "layers.0.mixer.o_proj.weight"]
        for parameter in trainer.model.parameters {
            if let attention = inherited[parameter.name] {
                #expect(trained[attention] == parameter.value.array, "\(parameter.name) starts as the attention's \(attention)")
            } else if parameter.name.hasPrefix("layers.0.mixer.") {
                #expect(trained[parameter.name] == nil, "\(parameter.name) is a new Phalanx tensor")
                #expect(parameter.name.contains(".param.proj_"))
            } else {
                #expect(trained[parameter.name] == parameter.value.array, "\(parameter.name) keeps its trained value")
            }
        }
        #expect(trainer.model.mixerKinds == [.phalanx, .attention])

        let outcome = try trainer.run(stopRequested: { false }, onStep: { #expect($0.loss.isFinite) }, onEvaluation: { _ in })
        #expect(outcome == .finished)
    }

    @Test("the same pattern is refused, naming --pattern's field; a missing checkpoint is an error naming the file")
    func refusals() throws {
        let folder = temporaryFolder()
        defer { try? FileManager.default.removeItem(at: folder) }
        let (corpus, checkpoint) = try trainedSource(in: folder)
        #expect { try Retrofit.plan(from: checkpoint, pattern: "SA", training: .init(), files: [corpus], seed: 1) }
            throws: { ($0 as? TrainingError)?.field == "pattern" }
        let missing = folder.appendingPathComponent("nothing.safetensors")
        #expect { try Retrofit.plan(from: missing, pattern: "PA", training: .init(), files: [corpus], seed: 1) }
            throws: { "\($0)".contains(missing.path) }
    }

    @Test("distillation: the new Phalanx mixer learns to reproduce the attention mixer it replaced; no other weight moves")
    func distillation() throws {
        let folder = temporaryFolder()
        defer { try? FileManager.default.removeItem(at: folder) }
        let (corpus, checkpoint) = try trainedSource(in: folder)
        let (teacher, _, _) = try TrainingCheckpoint.load(from: checkpoint)
        var training = TrainingConfiguration()
        (training.steps, training.batchSize, training.contextLength, training.warmupSteps) = (1, 2, 16, 1)
        (training.evaluationInterval, training.evaluationBatches, training.checkpointInterval) = (0, 1, 0)
        let plan = try Retrofit.plan(from: checkpoint, pattern: "PA", training: training, files: [corpus], seed: 9)
        let trainer = try TrainingRun.start(plan, in: folder.appendingPathComponent("retrofit"))
        let model = trainer.model
        var sampler = BatchSampler(batchSize: 2, contextLength: 16, generator: SeededGenerator(seed: 4))
        let batch = sampler.next(from: trainer.data.train)
        func distance() -> Float {
            let loss = model.distillMixers(from: teacher, blocks: [0], tokens: batch.inputs, batch: 2, length: 16)
            model.zeroGradients()
            return loss
        }
        let before = distance()
        let others = model.parameters.filter { !$0.name.hasPrefix("layers.0.mixer.") }.map(\.value.array)
        Retrofit.distill(model, from: teacher, data: trainer.data, steps: 40, training: training, seed: 9, log: { _ in })
        let after = distance()
        #expect(after < 0.5 * before, "mean squared difference \(before) -> \(after)")
        #expect(model.parameters.filter { !$0.name.hasPrefix("layers.0.mixer.") }.map(\.value.array) == others)
    }
}
