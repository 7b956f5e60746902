package io.clusterapp.counter;

import java.io.IOException;
import java.io.InputStream;
import java.security.MessageDigest;
import java.security.NoSuchAlgorithmException;
import java.security.cert.X509Certificate;
import java.util.Enumeration;

import jakarta.servlet.http.HttpServlet;
import jakarta.servlet.http.HttpServletRequest;
import jakarta.servlet.http.HttpServletResponse;

/**
 * Echoes what Tomcat saw of the request as JSON, so tests can check that
 * the proxy forwarded it exactly. The body is streamed into a SHA-256, never
 * held in memory. Any method is accepted.
 */
public class EchoServlet extends HttpServlet {
    private static final long serialVersionUID = 1L;

    @Override
    protected void service(HttpServletRequest req, HttpServletResponse resp) throws IOException {
        MessageDigest sha;
        try {
            sha = MessageDigest.getInstance("SHA-256");
        } catch (NoSuchAlgorithmException e) {
            throw new IOException(e);
        }
        long length = 0;
        byte[] buffer = new byte[64 * 1024];
        try (InputStream in = req.getInputStream()) {
            int n;
            while ((n = in.read(buffer)) > 0) {
                sha.update(buffer, 0, n);
                length += n;
            }
        }

        StringBuilder json = new StringBuilder(1024);
        json.append('{');
        field(json, "method", req.getMethod()).append(',');
        field(json, "requestURI", req.getRequestURI()).append(',');
        field(json, "queryString", req.getQueryString()).append(',');
        json.append("\"headers\":[");
        boolean first = true;
        for (Enumeration<String> names = req.getHeaderNames(); names.hasMoreElements();) {
            String name = names.nextElement();
            for (Enumeration<String> values = req.getHeaders(name); values.hasMoreElements();) {
                if (!first) {
                    json.append(',');
                }
                first = false;
                json.append('[');
                string(json, name).append(',');
                string(json, values.nextElement()).append(']');
            }
        }
        json.append("],");
        json.append("\"bodyLength\":").append(length).append(',');
        field(json, "bodySha256", hex(sha.digest())).append(',');
        field(json, "remoteAddr", req.getRemoteAddr()).append(',');
        json.append("\"remotePort\":").append(req.getRemotePort()).append(',');
        field(json, "localAddr", req.getLocalAddr()).append(',');
        json.append("\"localPort\":").append(req.getLocalPort()).append(',');
        field(json, "scheme", req.getScheme()).append(',');
        json.append("\"secure\":").append(req.isSecure()).append(',');
        field(json, "serverName", req.getServerName()).append(',');
        json.append("\"serverPort\":").append(req.getServerPort()).append(',');
        // What a TLS-terminating proxy forwarded (null over plain HTTP).
        field(json, "cipherSuite", attribute(req, "jakarta.servlet.request.cipher_suite")).append(',');
        field(json, "keySize", attribute(req, "jakarta.servlet.request.key_size")).append(',');
        field(json, "tlsProtocol", attribute(req, "org.apache.tomcat.util.net.secure_protocol_version")).append(',');
        Object certs = req.getAttribute("jakarta.servlet.request.X509Certificate");
        String clientCert = null;
        if (certs instanceof X509Certificate[] chain && chain.length > 0) {
            clientCert = chain[0].getSubjectX500Principal().getName();
        }
        field(json, "clientCertSubject", clientCert).append(',');
        field(json, "route", Route.jvmRoute());
        json.append("}\n");

        resp.setHeader("X-Route", Route.jvmRoute());
        resp.setContentType("application/json;charset=UTF-8");
        resp.getWriter().write(json.toString());
    }

    private static String attribute(HttpServletRequest req, String name) {
        Object value = req.getAttribute(name);
        return value == null ? null : value.toString();
    }

    private static StringBuilder field(StringBuilder json, String name, String value) {
        string(json, name).append(':');
        if (value == null) {
            return json.append("null");
        }
        return string(json, value);
    }

    private static StringBuilder string(StringBuilder json, String s) {
        json.append('"');
        for (int i = 0; i < s.length(); i++) {
            char c = s.charAt(i);
            switch (c) {
                case '"' -> json.append("\\\"");
                case '\\' -> json.append("\\\\");
                case '\n' -> json.append("\\n");
                case '\r' -> json.append("\\r");
                case '\t' -> json.append("\\t");
                default -> {
                    if (c < 0x20) {
                        json.append(String.format("\\u%04x", (int) c));
                    } else {
                        json.append(c);
                    }
                }
            }
        }
        return json.append('"');
    }

    private static String hex(byte[] bytes) {
        StringBuilder s = new StringBuilder(bytes.length * 2);
        for (byte b : bytes) {
            s.append(Character.forDigit((b >> 4) & 0xF, 16)).append(Character.forDigit(b & 0xF, 16));
        }
        return s.toString();
    }
}
