import Checkpoint
import Foundation
import PhalanxData
import PhalanxModels
import PhalanxRuntime
import PhalanxTraining
import Testing

/// A fresh folder under the temporary directory (not created).
private func scratchFolder() -> URL {
    FileManager.default.temporaryDirectory.appendingPathComponent("phalanx-safety-\(UUID().uuidString)")
}

/// A generated corpus file (no third-party text) in `folder`.
private func corpus(in folder: URL) throws -> URL {
    try FileManager.default.createDirectory(at: folder, withIntermediateDirectories: true)
    let url = folder.appendingPathComponent("corpus.txt")
    let words = ["north", "south", "east", "west", "up", "down", "left"]
    try (0..<300).map { i in "\(words[i % 7]) \(words[(i * 3 + 2) % 7]) \(i % 13)." }.joined(separator: "\n")
        .write(to: url, atomically: true, encoding: .utf8)
    return url
}

/// A run plan of a small model (one block of each mixer kind) on `corpus`, a few seconds long.
private func smallPlan(_ corpus: URL, steps: Int = 6) -> TrainingRun.Plan {
    var training = TrainingConfiguration()
    training.steps = steps
    training.batchSize = 2
    training.contextLength = 16
    training.warmupSteps = 2
    training.evaluationInterval = 0
    training.evaluationBatches = 1
    training.checkpointInterval = 0
    training.dropout = 0.1
    let model = ModelConfiguration(dim: 32, depth: 3, pattern: "PSA", attentionHeads: 2, window: 8, mlpHidden: 48)
    return TrainingRun.Plan(model: model, training: training, files: [corpus], seed: 5)
}

/// Every file in `folder` with its bytes (nil when the folder does not exist).
private func snapshot(_ folder: URL) -> [String: Data]? {
    guard let names = try? FileManager.default.contentsOfDirectory(atPath: folder.path) else { return nil }
    return Dictionary(uniqueKeysWithValues: names.map { ($0, (try? Data(contentsOf: folder.appendingPathComponent($0))) ?? Data()) })
}

/// `image` rewritten with `edit` applied to its metadata (tensors unchanged).
private func editingMetadata(_ image: Data, _ edit: (inout [String: String]) -> Void) throws -> Data {
    let file = try SafetensorsFile(data: image)
    var writer = SafetensorsWriter()
    for (name, info) in file.tensors.sorted(by: { $0.value.byteRange.lowerBound < $1.value.byteRange.lowerBound }) {
        writer.add(name, dtype: info.dtype, shape: info.shape, bytes: try file.bytes(name))
    }
    var metadata = file.metadata
    edit(&metadata)
    writer.metadata = metadata
    return try writer.serialized()
}

/// `image` with one JSON field of metadata `key` set to the literal `value` (`path`: nested keys).
private func editingJSON(_ image: Data, key: String, path: [String], value: String) throws -> Data {
    try editingMetadata(image) { metadata in
        var object = try! JSONSerialization.jsonObject(with: Data(metadata[key]!.utf8)) as! [String: Any]
        func set(_ object: inout [String: Any], _ path: ArraySlice<String>) {
            if path.count == 1 { object[path.first!] = "__value__"; return }
            var inner = object[path.first!] as! [String: Any]
            set(&inner, path.dropFirst())
            object[path.first!] = inner
        }
        set(&object, path[...])
        let text = String(decoding: try! JSONSerialization.data(withJSONObject: object), as: UTF8.self)
        metadata[key] = text.replacingOccurrences(of: "\"__value__\"", with: value)
    }
}

/// The error text of loading `image` as a training checkpoint, or nil when it loads.
private func refusal(_ image: Data) -> String? {
    do {
        try CheckpointFuzzing.load(image)
        return nil
    } catch {
        return "\(error)"
    }
}

@Suite("Hostile checkpoints are refused with an error naming the key, before anything is allocated")
struct HostileCheckpointTests {
    static let original = try! CheckpointFuzzing.sampleCheckpoint()

    @Test("the unmodified sample checkpoint loads")
    func originalLoads() {
        #expect(refusal(Self.original) == nil)
    }

    @Test("configuration sizes that ask for terabytes to exabytes, or that a layer cannot build, are refused", arguments: [
        ("dim", "1099511627776"), ("dim", "4294967296"), ("depth", "1000000000000"), ("depth", "0"), ("mlpHidden", "9223372036854775807"),
        ("mlpHidden", "0"), ("vocabulary", "4611686018427387904"), ("attentionHeads", "100000000000"), ("attentionHeadDim", "-2"),
        ("window", "9223372036854775807"), ("phalanxKVHeads", "0"),
    ])
    func hostileSizes(field: String, value: String) throws {
        let message = refusal(try editingJSON(Self.original, key: "model_config", path: [field], value: value))
        #expect(message?.contains("'model_config'") == true, "\(field) = \(value): \(message ?? "loaded")")
    }

    @Test("a RoPE base that is zero, negative or one is refused by name", arguments: ["0", "-10000", "1"])
    func ropeBase(value: String) throws {
        let message = refusal(try editingJSON(Self.original, key: "model_config", path: ["ropeBase"], value: value))
        #expect(message?.contains("ropeBase") == true, "\(message ?? "loaded")")
    }

    @Test("a configuration that disagrees with the embedding tensor names it")
    func vocabularyAgainstTensors() throws {
        let message = refusal(try editingJSON(Self.original, key: "model_config", path: ["vocabulary"], value: "300"))
        #expect(message?.contains("'embed_tokens.weight'") == true, "\(message ?? "loaded")")
    }

    @Test("training state out of range: negative or overshooting step, negative or non-finite time, batch beyond memory", arguments: [
        (["step"], "-1", "step -1"), (["step"], "99", "step 99"), (["elapsedSeconds"], "-5", "elapsedSeconds"),
        (["elapsedSeconds"], "1e999", "'training_state'"), (["tokensSeen"], "-1", "tokensSeen"), (["tokensSeen"], "9223372036854775807", "tokensSeen"),
        (["configuration", "steps"], "4611686018427387904", "steps"),
        (["configuration", "batchSize"], "100000000000", "batchSize"), (["configuration", "dropout"], "-0.1", "dropout"),
    ])
    func hostileState(path: [String], value: String, expected: String) throws {
        let message = refusal(try editingJSON(Self.original, key: "training_state", path: path, value: value))
        #expect(message?.contains(expected) == true, "\(path) = \(value): \(message ?? "loaded")")
    }

    @Test("a NaN or infinite weight is refused by tensor name and element")
    func nonFiniteWeights() throws {
        let file = try SafetensorsFile(data: Self.original)
        let start = file.tensors["embed_tokens.weight"]!.byteRange.lowerBound
        let dataStart = Self.original.count - file.tensors.values.map(\.byteRange.upperBound).max()!
        for bits: UInt32 in [0x7FC0_0000, 0xFF80_0000] {
            var image = Self.original
            withUnsafeBytes(of: bits.littleEndian) { image.replaceSubrange(dataStart + start + 12 ..< dataStart + start + 16, with: $0) }
            let message = refusal(image)
            #expect(message?.contains("'embed_tokens.weight'") == true && message?.contains("element 3") == true, "\(message ?? "loaded")")
        }
    }

    @Test("a fuzzed run of 2,000 hostile variants: every case loads or throws a message naming a key or bytes")
    func boundedFuzz() throws {
        let report = try CheckpointFuzzing.run(cases: 2000, seed: 11)
        #expect(report.cases == 2000 && report.refused + report.accepted == 2000)
        #expect(report.refused > 1500)
        #expect(report.vagueMessages.isEmpty, "\(report.vagueMessages)")
        #expect(SafetensorsMutator.Mutation.allCases.allSatisfy { (report.refusedBy[$0] ?? 0) > 0 || $0 == .dataByte })
    }
}

@Suite("Run folders: a failed command changes nothing, a checkpoint is never replaced unasked")
struct RunSafetyTests {
    @Test("refused options leave no folder and no token file behind",
          arguments: ["dropout -0.1", "batch size 1e8", "evaluation batches 0", "context overflowing Int"])
    func refusedBeforeWriting(option: String) throws {
        let root = scratchFolder()
        defer { try? FileManager.default.removeItem(at: root) }
        var plan = smallPlan(try corpus(in: root))
        let field: String
        switch option {
        case "dropout -0.1": (plan.training.dropout, field) = (-0.1, "dropout")
        case "batch size 1e8": (plan.training.batchSize, field) = (100_000_000, "batchSize")
        case "evaluation batches 0": (plan.training.evaluationBatches, field) = (0, "evaluationBatches")
        default: (plan.training.contextLength, field) = (Int.max, "contextLength")
        }
        let run = root.appendingPathComponent("run")
        #expect { _ = try TrainingRun.start(plan, in: run) } throws: { ($0 as? TrainingError)?.field == field }
        #expect(!FileManager.default.fileExists(atPath: run.path))
    }

    @Test("a folder holding a checkpoint is not started over without overwrite; a refused command changes no byte")
    func noSilentOverwrite() throws {
        let root = scratchFolder()
        defer { try? FileManager.default.removeItem(at: root) }
        let text = try corpus(in: root)
        let run = root.appendingPathComponent("run")
        _ = try TrainingRun.start(smallPlan(text, steps: 2), in: run).run(stopRequested: { false }, onStep: { _ in }, onEvaluation: { _ in })
        let before = snapshot(run)
        #expect(before?["checkpoint.safetensors"] != nil)
        #expect { _ = try TrainingRun.start(smallPlan(text, steps: 3), in: run) } throws: { ($0 as? TrainingError)?.field == "overwrite" }
        var bad = smallPlan(text, steps: 3)
        bad.overwrite = true
        bad.training.dropout = 1.5
        #expect { _ = try TrainingRun.start(bad, in: run) } throws: { ($0 as? TrainingError)?.field == "dropout" }
        #expect(snapshot(run) == before)

        var replace = smallPlan(text, steps: 3)
        replace.overwrite = true
        let trainer = try TrainingRun.start(replace, in: run)
        #expect(!FileManager.default.fileExists(atPath: trainer.checkpointURL.path), "the old checkpoint no longer claims the new token file")
        #expect(try TokenFile(contentsOf: TrainingRun.tokensURL(in: run)).train.count == trainer.data.train.count)
    }

    @Test("leftovers of a killed write are removed when a run starts or resumes")
    func stalePartialsRemoved() throws {
        let root = scratchFolder()
        defer { try? FileManager.default.removeItem(at: root) }
        let text = try corpus(in: root)
        let run = root.appendingPathComponent("run")
        try FileManager.default.createDirectory(at: run, withIntermediateDirectories: true)
        let stale = run.appendingPathComponent(".tokens.bin.\(UUID().uuidString).partial")
        try Data(count: 10).write(to: stale)
        let trainer = try TrainingRun.start(smallPlan(text, steps: 2), in: run)
        #expect(!FileManager.default.fileExists(atPath: stale.path))
        _ = try trainer.run(stopRequested: { false }, onStep: { _ in }, onEvaluation: { _ in })
        try Data(count: 10).write(to: stale)
        _ = try TrainingRun.resume(in: run)
        #expect(stalePartialFiles(in: run).isEmpty)
    }

    @Test("--resume with more steps extends a finished run; fewer than done is refused by name")
    func resumeExtends() throws {
        let root = scratchFolder()
        defer { try? FileManager.default.removeItem(at: root) }
        let run = root.appendingPathComponent("run")
        _ = try TrainingRun.start(smallPlan(try corpus(in: root), steps: 4), in: run).run(stopRequested: { false }, onStep: { _ in }, onEvaluation: { _ in })
        #expect { _ = try TrainingRun.resume(in: run, steps: 3) } throws: { ($0 as? TrainingError)?.field == "steps" }
        var lines: [String] = []
        let extended = try TrainingRun.resume(in: run, steps: 8, log: { lines.append($0) })
        #expect(lines.contains { $0.contains("from 4 to 8 steps") })
        var steps: [Int] = []
        #expect(try extended.run(stopRequested: { false }, onStep: { steps.append($0.step) }, onEvaluation: { _ in }) == .finished)
        #expect(steps == [5, 6, 7, 8])
        #expect(try TrainingCheckpoint.load(from: TrainingRun.checkpointURL(in: run)).state.step == 8)
    }

    @Test("interrupted after 3 of 6 steps and resumed, a run ends with the same weights, bit for bit, as one run straight through")
    func interruptedRunMatchesStraightRun() throws {
        let root = scratchFolder()
        defer { try? FileManager.default.removeItem(at: root) }
        let text = try corpus(in: root)
        let straight = try TrainingRun.start(smallPlan(text), in: root.appendingPathComponent("straight"))
        #expect(try straight.run(stopRequested: { false }, onStep: { _ in }, onEvaluation: { _ in }) == .finished)

        let split = root.appendingPathComponent("split")
        let first = try TrainingRun.start(smallPlan(text), in: split)
        #expect(try first.run(stopRequested: { first.state.step == 3 }, onStep: { _ in }, onEvaluation: { _ in }) == .interrupted(step: 3))
        let second = try TrainingRun.resume(in: split)
        #expect(second.checkpointStep == 3)
        #expect(try second.run(stopRequested: { false }, onStep: { _ in }, onEvaluation: { _ in }) == .finished)

        let a = try TrainingCheckpoint.load(from: straight.checkpointURL), b = try TrainingCheckpoint.load(from: second.checkpointURL)
        #expect(a.model.parameters.count == b.model.parameters.count)
        for (p, q) in zip(a.model.parameters, b.model.parameters) {
            #expect(p.name == q.name && p.value.array.map(\.bitPattern) == q.value.array.map(\.bitPattern), "\(p.name)")
        }
        #expect(a.optimizer.firstMoments.map { $0.array.map(\.bitPattern) } == b.optimizer.firstMoments.map { $0.array.map(\.bitPattern) })
        #expect(a.state.trainLosses == b.state.trainLosses)
    }

    @Test("a non-finite loss stops the run: the last good checkpoint stays, and a run that never wrote one says so")
    func divergence() throws {
        let root = scratchFolder()
        defer { try? FileManager.default.removeItem(at: root) }
        let text = try corpus(in: root)
        for interval in [1, 0] {
            var plan = smallPlan(text)
            plan.training.peakLearningRate = 1e30
            plan.training.warmupSteps = 0
            plan.training.checkpointInterval = interval
            let trainer = try TrainingRun.start(plan, in: root.appendingPathComponent("run\(interval)"))
            let outcome = try trainer.run(stopRequested: { false }, onStep: { _ in }, onEvaluation: { _ in })
            guard case .diverged(let step, _, let checkpointStep) = outcome else {
                Issue.record("expected divergence, got \(outcome)")
                continue
            }
            if interval == 1 {
                #expect(checkpointStep == step - 1)
                #expect(try TrainingCheckpoint.load(from: trainer.checkpointURL).state.step == step - 1)
            } else {
                #expect(checkpointStep == nil)
                #expect(!FileManager.default.fileExists(atPath: trainer.checkpointURL.path))
            }
        }
    }
}

@Suite("Configuration: one source for each setting, sizes computed without allocating")
struct ConfigurationSafetyTests {
    @Test("the parameter count computed from a configuration equals the built model's", arguments: [
        "transformer-tiny", "swa-hybrid-tiny", "phalanx-hybrid-tiny", "phalanx-hybrid-small",
    ])
    func parameterCountFormula(preset: String) throws {
        var configuration = try ModelConfiguration.preset(preset)
        #expect(configuration.parameterCount == (try LanguageModel(configuration, seed: 1)).parameterCount)
        configuration.tiedEmbedding = false
        configuration.depth = 5
        configuration.phalanxKVHeads = configuration.dim / 32
        configuration.attentionKVHeads = 1
        #expect(configuration.parameterCount == (try LanguageModel(configuration, seed: 1)).parameterCount)
    }

    @Test("block counts of a hostile depth are computed, not listed")
    func blockCounts() {
        let c = ModelConfiguration(dim: 16, depth: Int.max, pattern: "PPA", attentionHeads: 1, mlpHidden: 16)
        #expect(c.blockCounts[.phalanx]! + c.blockCounts[.attention]! == Int.max)
        #expect(c.parameterCount == nil)
        #expect { try c.validate() } throws: { ($0 as? ConfigurationError)?.field == "depth" }
    }

    @Test("training values are refused with the field and the allowed range")
    func trainingFields() {
        var c = TrainingConfiguration()
        c.dropout = -0.1
        #expect { try c.validate() } throws: { ($0 as? TrainingError)?.field == "dropout" && "\($0)".contains("[0, 1)") }
        c = TrainingConfiguration()
        c.batchSize = Int.max / 2
        c.contextLength = 4
        #expect { try c.validate() } throws: { ($0 as? TrainingError)?.field == "batchSize" }
    }

    @Test("the sampler draws with the configuration's batch shape; it stores only its stream position")
    func samplerShape() throws {
        let state = TrainingState(configuration: TrainingConfiguration(), samplerSeed: 3, dataPath: "", tokenizer: Data(), modelSeed: 1)
        let json = try JSONSerialization.jsonObject(with: JSONEncoder().encode(state)) as! [String: Any]
        #expect((json["sampler"] as! [String: Any]).keys.sorted() == ["generator"])
    }

    @Test("sampling from NaN or infinite logits returns the best finite token instead of trapping")
    func samplerSurvivesNonFiniteLogits() {
        var sampler = TokenSampler(temperature: 0.8, topK: 0, topP: 0.9, seed: 1)
        for logits: [Float] in [[.nan, 1, 3, 2], [1, .infinity, 3, 2], [.nan, .nan, .nan, .nan], [-.infinity, 2, 3, 1]] {
            let token = logits.withUnsafeBufferPointer { sampler.sample($0) }
            #expect(token == (logits.allSatisfy(\.isNaN) ? 0 : 2), "\(logits)")
        }
    }
}
