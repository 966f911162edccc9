import Checkpoint

extension ParameterContainer {
    /// Copies every parameter's value from a safetensors file, by name.
    ///
    /// Each parameter `p` is read from key `keyPrefix + p.name` (so a layer built under the name
    /// `""` loads the reference's `param.proj_a.weight`, and a layer of a model can be loaded from
    /// a file of that layer alone by passing its model prefix with `stripping:`). Float32 is
    /// taken as it is; bfloat16, float16 and float64 are converted on load.
    ///
    /// - Parameters:
    ///   - stripping: a prefix removed from parameter names before the lookup.
    /// - Throws: `SafetensorsError` naming the key and the expected shape when a key is missing,
    ///   has another shape, or is not a floating-point tensor. Nothing is modified then.
    public func load(from file: SafetensorsFile, keyPrefix: String = "", stripping: String = "") throws {
        var values: [(Parameter, [Float])] = []
        for p in parameters {
            var name = p.name
            if !stripping.isEmpty, name.hasPrefix(stripping) { name.removeFirst(stripping.count) }
            let key = keyPrefix + name
            guard let info = file.tensors[key] else {
                throw SafetensorsError("missing parameter '\(key)' (expected shape \(p.value.shape))")
            }
            guard [.float32, .bfloat16, .float16, .float64].contains(info.dtype) else {
                throw SafetensorsError("parameter '\(key)' is \(info.dtype.rawValue); expected a floating-point tensor of shape \(p.value.shape)")
            }
            values.append((p, try file.floats(key, shape: p.value.shape)))
        }
        for (p, v) in values { _ = p.value.buffer.update(fromContentsOf: v) }
    }
}
