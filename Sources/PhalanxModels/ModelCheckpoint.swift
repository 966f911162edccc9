import Checkpoint
import Foundation
import PhalanxLayers

extension LanguageModel {
    /// Metadata keys of a Phalanx checkpoint (a safetensors file).
    public enum CheckpointKey {
        /// Always `phalanx-checkpoint`; a file without it is refused with a clear message.
        public static let format = "format"
        /// The checkpoint format version, `checkpointVersion`; another value is refused.
        public static let version = "format_version"
        /// The `ModelConfiguration` as JSON.
        public static let configuration = "model_config"
    }

    /// The value of metadata `format` in every Phalanx checkpoint.
    public static let checkpointFormat = "phalanx-checkpoint"
    /// The checkpoint format version this code writes and reads (metadata `format_version`).
    public static let checkpointVersion = "1"

    /// Adds every parameter (by name, as float32), the configuration and the format marker and
    /// version to `writer`.
    ///
    /// - Throws: `EncodingError` when the configuration cannot be encoded as JSON.
    public func addWeights(to writer: inout SafetensorsWriter) throws {
        for p in parameters { writer.add(p.name, floats: p.value.array, shape: p.value.shape) }
        writer.metadata[CheckpointKey.format] = Self.checkpointFormat
        writer.metadata[CheckpointKey.version] = Self.checkpointVersion
        writer.metadata[CheckpointKey.configuration] = String(decoding: try JSONEncoder().encode(configuration), as: UTF8.self)
    }

    /// The model stored in a checkpoint: its configuration from the metadata, then every weight.
    ///
    /// Nothing is allocated before the configuration has passed `ModelConfiguration.validate()`
    /// (ranges, and weights that fit this machine's memory) and agrees with the file's own
    /// tensors: the model's parameter count must not exceed the values the file holds, and the
    /// embedding's shape must be `[vocabulary, dim]`. After loading, a non-finite weight is
    /// refused by name.
    ///
    /// - Throws: `SafetensorsError` naming `origin`, the key or tensor, and what was expected.
    public static func load(from file: SafetensorsFile, origin: String) throws -> LanguageModel {
        try checkFormat(of: file, origin: origin)
        let configuration = try storedConfiguration(file, origin: origin)
        let model = try LanguageModel(configuration, seed: 0)
        do {
            try model.load(from: file)
        } catch {
            throw SafetensorsError("\(origin): \(error)")
        }
        try checkFinite(model.parameters.map { ($0.name, $0.value) }, origin: origin)
        return model
    }

    /// Throws unless the metadata marks `file` as a Phalanx checkpoint of a supported version.
    ///
    /// - Throws: `SafetensorsError` naming `origin` and the metadata key at fault.
    public static func checkFormat(of file: SafetensorsFile, origin: String) throws {
        guard file.metadata[CheckpointKey.format] == checkpointFormat else {
            throw SafetensorsError("\(origin): not a Phalanx checkpoint (metadata '\(CheckpointKey.format)' is \(file.metadata[CheckpointKey.format].map { "'\(excerpt($0))'" } ?? "missing"))")
        }
        guard file.metadata[CheckpointKey.version] == checkpointVersion else {
            throw SafetensorsError("\(origin): metadata '\(CheckpointKey.version)' is \(file.metadata[CheckpointKey.version].map { "'\(excerpt($0))'" } ?? "missing"); this reader supports checkpoint format version \(checkpointVersion)")
        }
    }

    /// The configuration in the metadata, validated and checked against the file's tensors.
    static func storedConfiguration(_ file: SafetensorsFile, origin: String) throws -> ModelConfiguration {
        let key = CheckpointKey.configuration
        guard let json = file.metadata[key] else {
            throw SafetensorsError("\(origin): metadata '\(key)' (the model configuration) is missing")
        }
        let configuration: ModelConfiguration
        do {
            configuration = try JSONDecoder().decode(ModelConfiguration.self, from: Data(json.utf8))
        } catch {
            throw SafetensorsError("\(origin): metadata '\(key)' is not a readable model configuration (\(error))")
        }
        do {
            try configuration.validate()
        } catch {
            throw SafetensorsError("\(origin): metadata '\(key)': \(error)")
        }
        let stored = file.tensors.values.filter { [.float32, .float64, .float16, .bfloat16].contains($0.dtype) }
            .reduce(0) { $0 + $1.elementCount }
        let needed = configuration.parameterCount ?? Int.max
        guard needed <= stored else {
            throw SafetensorsError("\(origin): metadata '\(key)' describes \(needed) parameters, but the file's tensors hold only \(stored) values")
        }
        let embedding = "embed_tokens.weight"
        if let info = file.tensors[embedding], info.shape != [configuration.vocabulary, configuration.dim] {
            throw SafetensorsError("\(origin): tensor '\(embedding)' has shape \(info.shape), but metadata '\(key)' says vocabulary \(configuration.vocabulary) x dim \(configuration.dim)")
        }
        return configuration
    }
}

/// Throws, naming the first tensor that holds a NaN or an infinity and where.
///
/// - Throws: `SafetensorsError` naming `origin`, the tensor, the element index and its shape.
public func checkFinite(_ tensors: [(name: String, value: Tensor)], origin: String) throws {
    for (name, tensor) in tensors {
        let values = tensor.pointer
        for i in 0..<tensor.count where !values[i].isFinite {
            throw SafetensorsError("\(origin): tensor '\(name)' holds a non-finite value (\(values[i])) at element \(i) of shape \(tensor.shape)")
        }
    }
}

/// At most the first 40 characters of `value` (a hostile file can hold any text).
func excerpt(_ value: String) -> String {
    value.count <= 40 ? value : value.prefix(40) + "... (\(value.count) characters)"
}
