import Checkpoint
import Foundation
import PhalanxLayers

extension LanguageModel {
    /// Metadata keys of a Phalanx checkpoint (a safetensors file).
    public enum CheckpointKey {
        /// Always `phalanx-checkpoint`; a file without it is refused with a clear message.
        public static let format = "format"
        public static let version = "format_version"
        /// The `ModelConfiguration` as JSON.
        public static let configuration = "model_config"
    }

    public static let checkpointFormat = "phalanx-checkpoint"
    public static let checkpointVersion = "1"

    /// Adds every parameter (by name), the configuration and the format marker to `writer`.
    public func addWeights(to writer: inout SafetensorsWriter) throws {
        for p in parameters { writer.add(p.name, floats: p.value.array, shape: p.value.shape) }
        writer.metadata[CheckpointKey.format] = Self.checkpointFormat
        writer.metadata[CheckpointKey.version] = Self.checkpointVersion
        writer.metadata[CheckpointKey.configuration] = String(decoding: try JSONEncoder().encode(configuration), as: UTF8.self)
    }

    /// The model stored in a checkpoint: its configuration from the metadata, then every weight.
    public static func load(from file: SafetensorsFile, origin: String) throws -> LanguageModel {
        guard file.metadata[CheckpointKey.format] == checkpointFormat else {
            throw SafetensorsError("\(origin): not a Phalanx checkpoint (metadata 'format' is \(file.metadata[CheckpointKey.format].map { "'\($0)'" } ?? "missing"))")
        }
        guard file.metadata[CheckpointKey.version] == checkpointVersion else {
            throw SafetensorsError("\(origin): checkpoint format version \(file.metadata[CheckpointKey.version] ?? "?") is not supported (expected \(checkpointVersion))")
        }
        guard let json = file.metadata[CheckpointKey.configuration],
              let configuration = try? JSONDecoder().decode(ModelConfiguration.self, from: Data(json.utf8)) else {
            throw SafetensorsError("\(origin): the model configuration in the metadata is missing or unreadable")
        }
        let model = try LanguageModel(configuration, seed: 0)
        try model.load(from: file)
        return model
    }
}
